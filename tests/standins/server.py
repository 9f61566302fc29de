"""Serve an ASGI app on hypercorn over TLS (ALPN h2 + http/1.1).

`serve()` runs in the caller's event loop (the `python -m tests.standins` process);
`ServerThread` runs it in a background thread with its own loop, for sync pytest fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.statsd import StatsdLogger
from hypercorn.utils import wrap_app

from tests.standins.tls import TlsFiles

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
ALPN = ("h2", "http/1.1")
log = logging.getLogger("tests.standins.server")
GRACE = 1.0  # seconds requests in flight get to finish when the server stops
# Seconds to wait for the client's TLS close_notify after closing a connection: an HTTP/2
# client's idle pooled connection never answers it until its next use.
TLS_SHUTDOWN = 0.1


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)  # connections queue from now on, before the server accepts
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def base_url(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


async def serve(
    app: ASGIApp,
    tls: TlsFiles,
    *,
    shutdown: asyncio.Event,
    ready: Callable[[str], None],
    host: str = "127.0.0.1",
    port: int = 0,
    alpn: Sequence[str] = ALPN,
) -> None:
    """Serve `app` until `shutdown` is set; `ready(base_url)` once it accepts connections.

    hypercorn's own connection handling (TCPServer: h11, h2, ALPN) under an accept loop of our
    own, so that stopping never waits on a client that keeps an idle TLS connection open (an
    HTTP/2 client's pool does): after a short grace, open connections are aborted.
    """
    sock = _listen(host, port)
    config = Config()
    config.certfile = str(tls.cert_file)
    config.keyfile = str(tls.key_file)
    config.alpn_protocols = list(alpn)
    config.accesslog = None
    config.errorlog = log  # a plain logger: warnings and errors reach the root logger
    config.h2_max_concurrent_streams = 1000
    # Like the real services, keep connections: no GOAWAY after N requests (hypercorn's
    # default 1000 fails the streams a client has in flight then), idle ones close after 60 s.
    config.keep_alive_max_requests = 2**31
    config.keep_alive_timeout = 60.0
    config.set_statsd_logger_class(StatsdLogger)
    ssl_context = config.create_ssl_context()
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    context = WorkerContext(None)
    loop = asyncio.get_running_loop()
    connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = writer
        try:
            await TCPServer(wrapped, loop, config, context, {}, reader, writer)
        finally:
            connections.pop(task, None)

    server = await asyncio.start_server(
        connected,
        sock=sock,
        ssl=ssl_context,
        ssl_handshake_timeout=config.ssl_handshake_timeout,
        ssl_shutdown_timeout=TLS_SHUTDOWN,
    )
    try:
        ready(base_url(host, sock.getsockname()[1]))
        await shutdown.wait()
    finally:
        server.close()
        await context.terminated.set()  # idle connections close themselves
        if connections:
            await asyncio.wait(list(connections), timeout=GRACE)
        for task, writer in list(connections.items()):
            writer.transport.abort()
            task.cancel()
        if connections:
            await asyncio.wait(list(connections), timeout=GRACE)
        await server.wait_closed()


class ServerThread:
    """`serve()` in a daemon thread with its own event loop: start() → base URL, stop()."""

    def __init__(
        self,
        app: ASGIApp,
        tls: TlsFiles,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        alpn: Sequence[str] = ALPN,
        name: str = "standin",
    ) -> None:
        self.app = app
        self.tls = tls
        self.host = host
        self.port = port
        self.alpn = tuple(alpn)
        self.name = name
        self.url: str | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> str:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name} did not start within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"{self.name} failed to start") from self._error
        assert self.url is not None
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        thread, loop, shutdown = self._thread, self._loop, self._shutdown
        if thread is None:
            return
        if loop is not None and shutdown is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between, so the thread is ending anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(shutdown.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {timeout}s")
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"{self.name} failed") from error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start()/stop() in the caller's thread
            self._error = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()

        def ready(url: str) -> None:
            self.url = url
            self._ready.set()

        await serve(
            self.app,
            self.tls,
            shutdown=self._shutdown,
            ready=ready,
            host=self.host,
            port=self.port,
            alpn=self.alpn,
        )
