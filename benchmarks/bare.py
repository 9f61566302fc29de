"""The baseline for `ingest.py`: a raw ASGI callable with no framework, no validation, no store.

It reads the whole request body and answers 201 with a small JSON body, which is the least any
server must do for a POST. Run it exactly like Herald runs (`herald serve` uses these flags):

    uvicorn bare:app --app-dir benchmarks --http httptools --loop uvloop --ws websockets-sansio \
        --no-access-log --lifespan on --host 127.0.0.1 --port 8081
"""

from __future__ import annotations

import contextlib
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


def serve(port: int, workers: int) -> None:
    """`workers` processes on `port`, each binding its own SO_REUSEPORT socket, as `herald serve
    --workers` does (uvicorn's own --workers shares one socket): the baseline for `ingest.py
    --workers`. SIGINT or SIGTERM stops them all."""
    import os
    import signal

    import uvicorn

    from herald.supervisor import listener

    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: nothing has started a thread or a loop yet
            config = uvicorn.Config(
                app,
                http="httptools",
                loop="uvloop",
                ws="websockets-sansio",
                lifespan="on",
                access_log=False,
                log_level="warning",
            )
            uvicorn.Server(config).run([listener("127.0.0.1", port, shared=True)])
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    options = parser.parse_args()
    serve(options.port, options.workers)
