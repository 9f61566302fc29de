"""The baseline for `ingest.py`: a raw ASGI callable with no framework, no validation, no store.

It reads the whole request body and answers 201 with a small JSON body, which is the least any
server must do for a POST. Run it exactly like Herald runs (`herald serve` uses these flags):

    uvicorn bare:app --app-dir benchmarks --http httptools --loop uvloop --ws websockets-sansio \
        --no-access-log --lifespan on --host 127.0.0.1 --port 8081
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b'{"id":"00000000-0000-0000-0000-000000000000","readState":"unread"}'
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole body, as any real handler must before answering
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 201, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
