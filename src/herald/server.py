"""The HTTP server: uvicorn, configured for Herald, with a shutdown that closes live streams.

uvicorn's graceful shutdown waits for open responses to finish, and an SSE stream never finishes
by itself (WebSockets it closes with 1012, without a word to the client). So once the listening
sockets are closed, and before uvicorn shuts down, every stream is told why it ends (`closing`,
reason `shutdown`) and closes itself; only a stream that does not manage within the grace period
is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from collections.abc import Callable

import uvicorn

from herald import connections
from herald.api.app import Herald
from herald.websocket import WebSocket

log = logging.getLogger("herald.server")

GRACE_SECONDS = 3.0
# Live streams take nothing from the client but pings: uvicorn's default lets each WebSocket
# buffer a 16 MiB message.
WS_MAX_MESSAGE = 65_536


def config(app: Herald, host: str, port: int, **options: object) -> uvicorn.Config:
    services = app.state.services
    settings = services.settings
    proxies = settings.trusted_proxy_list
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=connections.protocol(settings, services.metrics),
        loop="uvloop",
        # Herald's own WebSocket protocol (herald/websocket.py): the same library as uvicorn's
        # "websockets-sansio", about half the memory per idle live stream.
        ws=WebSocket,
        lifespan="on",
        timeout_graceful_shutdown=int(GRACE_SECONDS),
        # Between requests (uvicorn's keep-alive); call_later takes any float.
        timeout_keep_alive=settings.idle_timeout,
        # X-Forwarded-For/-Proto only from configured proxies: uvicorn trusts 127.0.0.1 by
        # default, so any local process could claim to be any client.
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
        # No permessage-deflate: browsers always ask for it, and its compressor state costs
        # each connection tens of kilobytes (measured: ~65 KB instead of ~27 KB per socket),
        # which thousands of idle live streams cannot afford; the messages are small JSON.
        ws_per_message_deflate=False,
        ws_max_size=WS_MAX_MESSAGE,
        # No WebSocket pings: each one (every 20 s per connection) made a timer and a pong
        # parser's objects that lived until the next one, so with 10,000 idle streams the
        # cyclic GC always had ~50,000 young-but-lasting objects to walk (tens of ms a full
        # collection). A vanished device is found by TCP keep-alive instead (connections.py,
        # about as soon), and Herald's `keepalive` messages keep NATs open.
        ws_ping_interval=None,
        ws_ping_timeout=None,
        **options,  # type: ignore[arg-type]
    )


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one: every connection holds a file
    descriptor, and the usual soft limit (1,024) is reached long before memory runs out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        log.info("open files limit", extra={"limit": soft})
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning(
            "could not raise the open files limit", extra={"limit": soft, "error": str(exc)}
        )
        return
    log.info("raised the open files limit", extra={"from": soft, "to": hard})


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, started: Callable[[], object] | None = None):
        super().__init__(config)
        self.on_started = started  # the supervisor's: this worker serves

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting first: a device told `shutdown` reconnects at once, and with
        # SO_REUSEPORT (`herald serve --workers`) the kernel could hand it back to this worker,
        # which would cut it again, without a word, when the grace ends.
        for server in self.servers:
            server.close()
        app = self.config.app
        if isinstance(app, Herald):
            app.streams.close_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GRACE_SECONDS):
                    await app.streams.idle.wait()
        await super().shutdown(sockets)
