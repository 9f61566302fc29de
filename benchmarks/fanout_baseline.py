"""The baseline for `fanout.py`: the least a WebSocket fan-out server can do. No storage, no auth.

    WS   /stream/{user}                a device of `user`; told {"type": "ready"} once accepted
    POST /users/{user}/notifications   the body (a JSON object) is sent to every socket of `user`
                                       as {"type": "created", "notification": <body>}, then 201

Run it exactly like Herald runs (`herald serve` uses these flags):

    uvicorn fanout_baseline:app --app-dir benchmarks --http httptools --loop uvloop \
        --ws websockets-sansio --no-access-log --host 127.0.0.1 --port 8081

With FANOUT_REDIS_URL set (`fanout.py --nodes N`), several such processes are joined by Redis
pub/sub, the least a cluster can do: a POST publishes `user` and the message on one channel, and
every process sends what it receives to its own sockets of that user. The 201 follows the
PUBLISH.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

sockets: defaultdict[str, set[WebSocket]] = defaultdict(set)
REDIS_URL = os.environ.get("FANOUT_REDIS_URL")
CHANNEL = "fanout"
publisher: list[object] = []  # the Redis client, once started (--nodes)


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


async def send(user: str, message: str) -> None:
    for ws in list(sockets.get(user, ())):
        with contextlib.suppress(Exception):  # a socket closing now must not cost the others
            await ws.send_text(message)


async def post(request: Request) -> Response:
    body = await request.body()
    # Wrap the posted bytes without parsing them: the cheapest message of Herald's shape.
    message = '{"type":"created","notification":' + body.decode() + "}"
    user = request.path_params["user"]
    if publisher:
        await publisher[0].publish(CHANNEL, user + "\n" + message)  # type: ignore[attr-defined]
    else:
        await send(user, message)
    return Response(b'{"status":"sent"}', status_code=201, media_type="application/json")


async def relay(pubsub: object) -> None:
    """Every message on the channel to this process's sockets of its user."""
    async for item in pubsub.listen():  # type: ignore[attr-defined]
        if item["type"] == "message":
            user, message = item["data"].decode().split("\n", 1)
            await send(user, message)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    if REDIS_URL is None:
        yield
        return
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    task = asyncio.create_task(relay(pubsub))
    publisher.append(client)
    try:
        yield
    finally:
        task.cancel()
        await pubsub.aclose()
        await client.aclose()


async def health(request: Request) -> Response:
    return Response(b"ok")


app = Starlette(
    routes=[
        WebSocketRoute("/stream/{user}", stream),
        Route("/users/{user}/notifications", post, methods=["POST"]),
        Route("/healthz", health),
    ],
    lifespan=lifespan,
)
