"""The HTTP/1.1 client for the push services and URLs that speak it: Web Push endpoints, FCM, WNS,
webhooks. Keep-alive connections per origin on the running loop; each request written as one
buffer; answers parsed by httptools (llhttp, the parser Herald's server already uses) and read up
to MAX_ANSWER bytes.

Why not a client library: httpx's pool bookkeeping walks every pooled connection on each
request (0.9-3 ms of CPU per request at 1-64 in flight; benchmarks/README.md, "Push"), and
aiohttp, used after it, spent its time in request machinery (request and response objects,
timers, header merging, its payload registry): 31 % of the samples of a Web Push drain
(`benchmarks/push.py --preload --py-spy`), more than the encryption, and 3 times this client's
CPU per request (`benchmarks/pushclient.py`). Push needs little of either: no cookies,
redirects, proxies, compression or streaming. (APNs needs HTTP/2, which this lacks: it keeps
httpx, one multiplexed connection and no pool to walk.)

* Failures raise httpx's exceptions, as the httpx client does (senders handle one kind):
  `ReadTimeout` when `timeout` (connect, send and answer together) runs out, `ConnectError` when
  no answer came, `RemoteProtocolError` for a malformed one, `UnsupportedProtocol` for a URL that
  cannot work.
* A reused connection that the server closed before answering is replaced once by a new one (the
  request never reached it, or went unanswered: both ways the server may close an idle one).
* `public_only`: connections go only to public addresses, checked on the addresses connected to,
  so a name that resolves differently a second time (DNS rebinding) gains nothing (guard.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode

import httptools
import httpx

import herald.outbound.providers.guard as guard

MAX_ANSWER = 16_384  # bytes of an answer's body that are read; the rest is ignored
MAX_HEAD = 65_536  # bytes of an answer's status line and headers
KEEP_IDLE = 15.0  # seconds an idle connection is kept (shorter than servers keep theirs)
DNS_TTL = 60.0
MAX_ENTRIES = 10_000  # URLs parsed and names resolved, kept (each a dict, cleared when full)
DEFAULT_HEADERS = {"User-Agent": "Herald", "Accept-Encoding": "identity"}
FRAMING = {"content-length", "transfer-encoding", "host", "connection"}  # the client's to write


class Answer:
    """An answer, as the senders read it (httpx.Response's names). Not an httpx.Response:
    building one (headers normalised, content streamed through decoders) was a tenth of a Web
    Push's CPU."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # case-insensitive
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class Headers(Mapping[str, str]):
    """An answer's headers by case-insensitive name; repeated ones joined with ", " (as httpx
    reads them). Content-Encoding is left out (bodies are asked for uncompressed) and so are
    values that are not ASCII (httpx took them so)."""

    __slots__ = ("_by_name",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        by_name: dict[str, str] = {}
        for name, value in pairs:
            name = name.lower()
            if name == "content-encoding" or not value.isascii():
                continue
            by_name[name] = f"{by_name[name]}, {value}" if name in by_name else value
        self._by_name = by_name

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


Origin = tuple[str, str, int]  # scheme, host, port: the connections a request may reuse


@dataclass(frozen=True, slots=True)
class Target:
    """A URL as requests to it need it, worked out once per URL."""

    origin: Origin
    tls: bool
    host: str  # to connect to and to name in TLS: IDNA, an IPv6 address without brackets
    port: int
    request_line_rest: bytes  # after the method: " /path?query HTTP/1.1\r\nHost: ...\r\n"


def target(url: str) -> Target:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:  # registered before a stricter check: never works
        raise httpx.UnsupportedProtocol(f"invalid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise httpx.UnsupportedProtocol(f"invalid URL: not an http(s) URL with a host: {url!r}")
    tls = parsed.scheme == "https"
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if tls else 80)
    named = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        named += f":{port}"
    path = parsed.raw_path or b"/"
    rest = b" " + path + b" HTTP/1.1\r\nHost: " + named.encode("ascii") + b"\r\n"
    return Target((parsed.scheme, host, port), tls, host, port, rest)


def head_lines(headers: Mapping[str, str]) -> bytes:
    """Header lines, refusing a name or value that would end a line early (header injection)."""
    lines = []
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        if line.count("\n") != 1 or "\r" in line[:-2] or "\0" in line:
            raise httpx.LocalProtocolError(f"invalid header {name!r}")
        lines.append(line)
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise httpx.LocalProtocolError("a header is not Latin-1") from exc


class _Stale(Exception):
    """A reused connection closed before any byte of the answer."""


class Pools:
    """A client's connections: the idle ones by origin (most recently used last), and every
    open one."""

    def __init__(self) -> None:
        self.idle: dict[Origin, deque[Connection]] = {}
        self.every: set[Connection] = set()


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; idle, it waits in its origin's pool."""

    def __init__(self, pools: Pools, origin: Origin) -> None:
        self.pools = pools
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.timer: asyncio.TimerHandle | None = None  # the request's deadline
        self.idle_since = 0.0  # loop time it went back to the pool
        self.closed = False
        self.reset()

    def reset(self) -> None:
        self.heard = 0  # bytes of this answer so far
        self.status = 0  # once its headers are complete
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.framed = False  # its body has a length or is chunked (else the close ends it)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP transport (uvloop's or not)
        self.pools.every.add(self)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # nothing asked: a server talking out of turn
            self.close()
            return
        self.heard += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(httpx.RemoteProtocolError(f"malformed answer: {exc}"))
            return
        if not self.status and self.heard > MAX_HEAD and self.waiter is not None:
            self.fail(httpx.RemoteProtocolError("the answer's headers are too large"))  # so far

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pools.every.discard(self)
        idle = self.pools.idle.get(self.origin)
        if idle is not None and self in idle:
            idle.remove(self)
        if self.waiter is None:
            return
        if self.status and not self.framed:
            self.finish(reusable=False)  # the close ends the body
        elif not self.heard:
            self.fail(_Stale())
        else:
            self.fail(
                httpx.RemoteProtocolError("the connection closed in the middle of the answer")
            )

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if sum(len(n) + len(v) for n, v in self.headers) > MAX_HEAD:  # arrived in one read
            self.fail(httpx.RemoteProtocolError("the answer's headers are too large"))
            return
        names = {name.lower() for name, _ in self.headers}
        self.framed = "content-length" in names or "transfer-encoding" in names

    def on_body(self, body: bytes) -> None:
        room = MAX_ANSWER - len(self.body)
        if len(body) < room:
            self.body += body
        elif self.waiter is not None:  # enough: the rest is not read, nor the connection kept
            self.body += body[:room]
            self.finish(reusable=False)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 and self.status != 101:  # interim (100 Continue): more follows
            self.reset()
            return
        if self.waiter is not None:
            self.finish(reusable=self.parser.should_keep_alive())

    # -- requests ----------------------------------------------------------------------------

    def fresh(self, now: float) -> bool:
        """Whether this idle connection may take a request (the server may have closed it)."""
        open_ = not self.closed and self.transport is not None and not self.transport.is_closing()
        return open_ and now - self.idle_since <= KEEP_IDLE

    async def send(self, data: bytes, deadline: float) -> Answer:
        """Write the request; its answer, or TimeoutError once the loop's clock passes
        `deadline` (a timer of the loop's own: asyncio.timeout was 6 % of a push)."""
        assert self.transport is not None and self.waiter is None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self.waiter = waiter
        self.timer = loop.call_at(deadline, self.fail, TimeoutError())
        self.transport.write(data)
        try:
            return await waiter
        except asyncio.CancelledError:  # an answer is still owed on it: never reused
            self.fail(TimeoutError())
            raise

    def finish(self, reusable: bool) -> None:
        waiter, self.waiter = self.waiter, None
        assert waiter is not None
        if self.timer is not None:
            self.timer.cancel()
        answer = Answer(self.status, Headers(self.headers), bytes(self.body))
        self.reset()
        if reusable and not self.closed:
            self.idle_since = asyncio.get_running_loop().time()
            self.pools.idle.setdefault(self.origin, deque()).append(self)
        else:
            self.close()
        if not waiter.done():
            waiter.set_result(answer)

    def fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if self.timer is not None:
            self.timer.cancel()
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Http1:
    """Keep-alive connections to any number of origins, any number at once per origin. Belongs
    to the loop of its first request."""

    def __init__(self, context: ssl.SSLContext, timeout: float, public_only: bool = False) -> None:
        self.context = context
        self.timeout = timeout
        self.public_only = public_only
        self.pools = Pools()
        self.targets: dict[str, Target] = {}
        self.names: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self.next_sweep = 0.0

    async def request(
        self,
        method: str,
        url: str,
        content: bytes | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request; its answer, the body read up to MAX_ANSWER bytes."""
        to = self.targets.get(url)
        if to is None:  # parsed once per URL: parsing was a tenth of a push's CPU
            to = target(url)
            if len(self.targets) >= MAX_ENTRIES:
                self.targets.clear()
            self.targets[url] = to
        given = headers or {}
        named = {name.lower() for name in given}  # the client's own give way, whatever the case
        fields = {k: v for k, v in DEFAULT_HEADERS.items() if k.lower() not in named}
        if data is not None:
            content = urlencode(data).encode()
            if "content-type" not in named:
                fields["Content-Type"] = "application/x-www-form-urlencoded"
        body = content or b""
        fields |= {k: v for k, v in given.items() if k.lower() not in FRAMING}
        fields["Content-Length"] = str(len(body))
        message = (
            method.encode("ascii") + to.request_line_rest + head_lines(fields) + b"\r\n" + body
        )
        try:
            return await self._exchange(to, message)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(
                "no answer in time", request=httpx.Request(method, url)
            ) from exc
        except httpx.HTTPError:
            raise
        except (OSError, ValueError, _Stale) as exc:  # ssl.SSLError is an OSError
            name = type(exc).__name__
            raise httpx.ConnectError(name, request=httpx.Request(method, url)) from exc

    async def _exchange(self, to: Target, message: bytes) -> Answer:
        now = asyncio.get_running_loop().time()
        deadline = now + self.timeout
        if now >= self.next_sweep:
            self.sweep(now)
        idle = self.pools.idle.get(to.origin)
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if not conn.fresh(now):
                conn.close()
                continue
            try:
                return await conn.send(message, deadline)
            except _Stale:  # closed while idle: try the next, or a new connection
                continue
        async with asyncio.timeout_at(deadline):
            conn = await self._connect(to)
        return await conn.send(message, deadline)

    def sweep(self, now: float) -> None:
        """Close the connections idle for more than KEEP_IDLE (at most every KEEP_IDLE s)."""
        self.next_sweep = now + KEEP_IDLE
        for origin, idle in list(self.pools.idle.items()):
            for conn in [c for c in idle if now - c.idle_since > KEEP_IDLE]:
                conn.close()  # it leaves `idle` when the close completes
            if not idle:  # origins come and go (endpoints are the devices' choice)
                del self.pools.idle[origin]

    async def _connect(self, to: Target) -> Connection:
        loop = asyncio.get_running_loop()
        failed: OSError | None = None
        for family, address in await self._resolve(to.host, to.port):
            try:
                _, conn = await loop.create_connection(
                    lambda: Connection(self.pools, to.origin),
                    address,
                    to.port,
                    family=family,
                    ssl=self.context if to.tls else None,
                    server_hostname=to.host if to.tls else None,
                )
            except OSError as exc:
                failed = exc
                continue
            return conn
        raise failed or OSError(f"{to.host} has no address")

    async def _resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        loop = asyncio.get_running_loop()
        cached = self.names.get((host, port))
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = list(
            dict.fromkeys((int(family), str(sockaddr[0])) for family, *_, sockaddr in infos)
        )
        if self.public_only and any(not guard.public_address(a) for _, a in found):
            raise OSError(f"{host} resolves to a private address")
        if len(self.names) >= MAX_ENTRIES:
            self.names.clear()
        self.names[(host, port)] = (loop.time() + DNS_TTL, found)
        return found

    async def aclose(self) -> None:
        for conn in list(self.pools.every):
            conn.close()
        self.pools = Pools()
