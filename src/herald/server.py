"""The HTTP server: uvicorn, configured for Herald, with a shutdown that closes live streams.

uvicorn's graceful shutdown waits for open responses to finish, and an SSE stream never finishes
by itself (WebSockets it closes with 1012, without a word to the client). So before uvicorn shuts
down, every stream is told why it ends (`closing`, reason `shutdown`) and closes itself; only a
stream that does not manage within the grace period is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn

from herald.api.app import Herald

GRACE_SECONDS = 3.0


def config(app: Herald, host: str, port: int, **options: object) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        loop="uvloop",
        ws="websockets-sansio",
        lifespan="on",
        timeout_graceful_shutdown=int(GRACE_SECONDS),
        # No permessage-deflate: browsers always ask for it, and its compressor state costs
        # each connection tens of kilobytes (measured: ~65 KB instead of ~27 KB per socket),
        # which thousands of idle live streams cannot afford; the messages are small JSON.
        ws_per_message_deflate=False,
        **options,  # type: ignore[arg-type]
    )


class Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        if isinstance(app, Herald):
            app.streams.close_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GRACE_SECONDS):
                    await app.streams.idle.wait()
        await super().shutdown(sockets)
