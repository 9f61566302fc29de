"""Connections: how much a client may send before its request is complete, and for how long.

uvicorn's httptools protocol sets no limit on a request's URL or headers (llhttp has none, and
httptools gathers a header in memory until its line ends), and its only timeout is the keep-alive
after a response: a connection that never sends a byte, or stops halfway through its headers or
its body, stays open for ever. `Connection` is that protocol with, per connection:

* a size limit on the request head: the URL (`max_url_bytes`, 414) and the request line with its
  headers (`max_header_bytes`, 431), WebSocket handshakes included (they are parsed here first);
* a time limit on the head (`header_timeout`: from the connection's opening for its first
  request, from the first read of a later one that leaves it incomplete) and on the body
  (`body_timeout`, likewise from the end of the headers), answered 408 (a connection that sent
  nothing is just closed);
* at most `max_pending_per_address` *pending* connections per client address, pending meaning
  opened but no complete request head yet: a connection beyond that is answered 429 at once.
  Trusted proxies are exempt (their clients' addresses are only known from their headers).

A refusal is a Graph error body with `Connection: close`; Herald then stops parsing, half-closes,
and drops what the client still sends for a moment, so the client reads the answer instead of a
reset. Between requests uvicorn's keep-alive timeout applies (`idle_timeout`); a WebSocket leaves
this protocol at its upgrade, and a response in progress (an SSE stream) is never timed out here.
Deadlines are checked by one timer for all connections (`Guard.sweep`): a request costs a few
attribute stores, not a timer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from herald.api.errors import error_body, error_headers, request_id
from herald.errors import (
    HeadersTooLarge,
    HeraldError,
    RequestTimeout,
    Throttled,
    UriTooLong,
)
from herald.settings import Settings

if TYPE_CHECKING:
    from herald.metrics import Metrics

log = logging.getLogger("herald.connections")

SWEEP_SECONDS = 1.0  # at most; shorter when a timeout is short
KEEPALIVE_IDLE = 20  # s idle before TCP keep-alive probes begin
KEEPALIVE_INTERVAL = 5  # s between probes
KEEPALIVE_COUNT = 4  # unanswered probes before the kernel drops the connection
LINGER_SECONDS = 2.0  # how long a refused connection's further input is read and dropped
# A request line's parts besides the URL ("GET ", " HTTP/1.1\r\n") and each header's ": \r\n".
LINE_OVERHEAD = 24
HEADER_OVERHEAD = 4


class Refusal(Exception):
    """Raised in a parser callback to stop parsing and refuse the request."""

    def __init__(self, error: HeraldError) -> None:
        super().__init__(error.message)
        self.error = error


class Guard:
    """What the connections of one server share: the limits, the pending connections per
    address, and the timer that enforces deadlines."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.max_url = settings.max_url_bytes
        self.max_head = settings.max_header_bytes
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.per_address = settings.max_pending_per_address
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxy_list]
        self.metrics = metrics
        self.pending: dict[str, int] = {}
        self.watched: set[Connection] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.tick = min(SWEEP_SECONDS, self.header_timeout / 4, self.body_timeout / 4)

    def trusted(self, host: str) -> bool:
        if not self.proxies:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)

    def watch(self, connection: Connection) -> None:
        self.watched.add(connection)
        if self.timer is None:
            self.timer = connection.loop.call_later(self.tick, self.sweep, connection.loop)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for connection in [c for c in self.watched if c.deadline is not None]:
            if connection.deadline is not None and connection.deadline <= now:
                connection.expire()
        self.timer = loop.call_later(self.tick, self.sweep, loop) if self.watched else None

    def refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason).inc()


class Connection(HttpToolsProtocol):
    """uvicorn's httptools protocol with Herald's limits (see the module docstring)."""

    guard: Guard  # set on the subclass `protocol()` makes for each server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = b""
        self.head = 0  # bytes received since the current request head began (or more)
        self.in_head = True  # between requests, or inside a request head
        self.deadline: float | None = None  # loop time the current phase must end by
        self.counted: str | None = None  # the address this connection is pending for
        self.refusal: HeraldError | None = None  # once set, the connection only winds down

    # -- the connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        keep_alive(transport)
        guard = self.guard
        guard.watch(self)
        self.deadline = self.loop.time() + guard.header_timeout
        host = self.client[0] if self.client else None
        if host is None or guard.trusted(host):
            return
        count = guard.pending.get(host, 0) + 1
        if count > guard.per_address:
            guard.refused("pending")
            wait = max(1, math.ceil(guard.header_timeout))
            # Closed at once: it sent nothing yet, so nothing is lost to a reset, and an address
            # over its bound holds no more descriptors than the bound.
            self.refuse(Throttled(TOO_MANY_PENDING, retry_after=wait), linger=False)
            return
        guard.pending[host] = count
        self.counted = host

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.guard.watched.discard(self)
        super().connection_lost(exc)

    def release(self) -> None:
        """This connection no longer counts as pending for its address."""
        host, self.counted = self.counted, None
        if host is not None:
            count = self.guard.pending[host] - 1
            if count:
                self.guard.pending[host] = count
            else:
                del self.guard.pending[host]

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, plus the limits; a refusal raised by a callback stops the parser.
        if self.refusal is not None:
            return  # refused: dropped while the answer goes out
        self.head += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, Refusal):
                self.refuse(exc.__context__.error)
            else:
                self.invalid()
            return
        except httptools.HttpParserError:
            self.invalid()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.in_head:
            if self.head:  # part of a head (blank lines included): it must be complete in time
                self.check_head()
        elif self.deadline is None:  # part of a body: likewise
            self.deadline = self.loop.time() + self.guard.body_timeout

    def check_head(self) -> None:
        guard = self.guard
        if self.deadline is None:
            self.deadline = self.loop.time() + guard.header_timeout
        if len(self.url) > guard.max_url:
            guard.refused("url")
            self.refuse(UriTooLong(URL_TOO_LONG.format(guard.max_url)))
        elif self.head > guard.max_head:
            guard.refused("headers")
            self.refuse(HeadersTooLarge(HEAD_TOO_LARGE.format(guard.max_head)))

    def invalid(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # -- parser callbacks -----------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        guard = self.guard
        if len(self.url) > guard.max_url:
            guard.refused("url")
            raise Refusal(UriTooLong(URL_TOO_LONG.format(guard.max_url)))
        # `head` counts whole reads, which may hold a body too: measure exactly only then.
        if self.head > guard.max_head and _head_size(self.url, self.headers) > guard.max_head:
            guard.refused("headers")
            raise Refusal(HeadersTooLarge(HEAD_TOO_LARGE.format(guard.max_head)))
        self.in_head = False
        self.head = 0
        self.deadline = None  # a body not complete by the end of this read gets one
        if self.counted is not None:
            self.release()
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head = 0
        self.deadline = None  # answering now: the app's time, then uvicorn's keep-alive
        HttpToolsProtocol.on_message_complete(self)

    def handle_websocket_upgrade(self) -> None:
        # From here the WebSocket protocol owns the transport: no deadline, not pending.
        self.release()
        self.deadline = None
        self.guard.watched.discard(self)
        super().handle_websocket_upgrade()

    # -- refusing -------------------------------------------------------------------------------
    def expire(self) -> None:
        """The current phase's deadline passed: answer 408 if a request was under way."""
        self.deadline = None
        cycle = self.cycle
        if self.in_head:
            if cycle is not None and not cycle.response_complete:
                # A pipelined head while the previous answer is still going out: later.
                self.deadline = self.loop.time() + self.guard.header_timeout
                return
            if self.head == 0:
                self.guard.refused("idle")
                self.transport.close()  # it sent nothing of a request: nothing to answer
                return
            what = "headers"
        else:
            if self.flow.read_paused:
                # Herald stopped reading (the app has not taken the body so far): not the
                # client's delay. Look again later.
                self.deadline = self.loop.time() + self.guard.body_timeout
                return
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app waiting for the body learns it never comes
                cycle.message_event.set()
            if cycle is None or cycle.response_started:
                self.guard.refused("body_timeout")
                self.transport.close()
                return
            what = "body"
        self.guard.refused(f"{what}_timeout")
        self.refuse(RequestTimeout(TIMED_OUT.format(what)))

    def refuse(self, exc: HeraldError, linger: bool = True) -> None:
        """Answer `exc` and close the connection: at once, or after a moment of reading and
        dropping (still counted as pending, if it was)."""
        self.refusal = exc
        self.deadline = None
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            transport.close()  # an answer is half sent: no room for another one
            return
        log.warning(
            "connection refused",
            extra={"client": self.client[0] if self.client else None, "error": exc.message},
        )
        transport.write(_answer(exc))
        if not linger:
            transport.close()  # after the answer is written
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.flow.resume_reading()  # keep draining what the client sends, so it gets the answer
        self.loop.call_later(LINGER_SECONDS, transport.close)


URL_TOO_LONG = "The request URL is longer than {} bytes."
HEAD_TOO_LARGE = "The request line and headers are larger than {} bytes."
TIMED_OUT = "The request {} did not arrive in time."
TOO_MANY_PENDING = (
    "Too many connections from this address have not sent a request yet; retry later."
)


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return LINE_OVERHEAD + len(url) + sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in headers)


def _answer(exc: HeraldError) -> bytes:
    """The raw HTTP response for a refusal: the Graph error body, and `Connection: close`."""
    scope: dict[str, Any] = {"headers": []}
    body = error_body(exc, scope)
    lines = [
        f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        f"request-id: {request_id(scope)}",
        "connection: close",
    ]
    lines += [f"{k.lower()}: {v}" for k, v in error_headers(exc).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def keep_alive(transport: asyncio.Transport) -> None:
    """TCP keep-alive: the kernel probes a connection idle for KEEPALIVE_IDLE s and drops it
    when KEEPALIVE_COUNT probes KEEPALIVE_INTERVAL s apart go unanswered. This is how a live
    stream's vanished device is found (Herald sends no WebSocket pings, see server.py): in
    about 40 s, as with uvicorn's pings, without a Python object per connection."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):  # an option this platform lacks
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def protocol(settings: Settings, metrics: Metrics | None = None) -> type[Connection]:
    """The protocol class for one server (uvicorn's `Config(http=...)`), with its own guard."""
    return type("HeraldConnection", (Connection,), {"guard": Guard(settings, metrics)})
