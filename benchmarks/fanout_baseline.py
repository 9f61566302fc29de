"""The baseline for `fanout.py`: the least a WebSocket fan-out server can do. No storage, no auth.

    WS   /stream/{user}                a device of `user`; told {"type": "ready"} once accepted
    POST /users/{user}/notifications   the body (a JSON object) is sent to every socket of `user`
                                       as {"type": "created", "notification": <body>}, then 201

Run it exactly like Herald runs (`herald serve` uses these flags):

    uvicorn fanout_baseline:app --app-dir benchmarks --http httptools --loop uvloop \
        --ws websockets-sansio --no-access-log --host 127.0.0.1 --port 8081
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

sockets: defaultdict[str, set[WebSocket]] = defaultdict(set)


async def stream(ws: WebSocket) -> None:
    user = ws.path_params["user"]
    await ws.accept()
    sockets[user].add(ws)
    try:
        await ws.send_text('{"type":"ready","position":0}')
        while True:  # devices send nothing; this only waits for the disconnect
            await ws.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        sockets[user].discard(ws)


async def post(request: Request) -> Response:
    body = await request.body()
    # Wrap the posted bytes without parsing them: the cheapest message of Herald's shape.
    message = '{"type":"created","notification":' + body.decode() + "}"
    for ws in list(sockets.get(request.path_params["user"], ())):
        with contextlib.suppress(Exception):  # a socket closing now must not cost the others
            await ws.send_text(message)
    return Response(b'{"status":"sent"}', status_code=201, media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b"ok")


app = Starlette(
    routes=[
        WebSocketRoute("/stream/{user}", stream),
        Route("/users/{user}/notifications", post, methods=["POST"]),
        Route("/healthz", health),
    ]
)
