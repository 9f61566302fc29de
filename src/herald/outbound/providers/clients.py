"""The HTTP clients push requests go through: TLS with the operator's CA, answers read up to a
bound, and (for device-chosen endpoints) connections to public addresses only."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import httpx
import yarl
from aiohttp.abc import ResolveResult
from multidict import CIMultiDict

import herald.outbound.providers.guard as guard


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The system's CAs plus `ca_file` (a private relay, a test), whatever SSL_CERT_FILE or
    REQUESTS_CA_BUNDLE say (clients are built with trust_env=False)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


def client(ca_file: str, timeout: float, http2: bool = False) -> httpx.AsyncClient:
    """An HTTP client for one push service (no proxies or CAs from the environment; answers
    uncompressed, so `exchange` can bound them by their size on the wire)."""
    return httpx.AsyncClient(
        verify=tls_context(ca_file),
        trust_env=False,
        headers={"Accept-Encoding": "identity"},
        http2=http2,
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        follow_redirects=False,
    )


MAX_ANSWER = 16_384  # bytes of a push service's answer that are read; the rest is ignored
MAX_URLS = 10_000  # endpoints parsed (a dict, cleared when full)
_urls: dict[str, yarl.URL] = {}


class Http1:
    """An HTTP/1.1 client for push services on aiohttp.

    Why not httpx here: its connection pool's bookkeeping walks every pooled connection on each
    request, and measured 0.9-3 ms of CPU per request at 1-64 requests in flight, against
    0.09-0.15 ms for aiohttp (benchmarks/README.md, "Push"); with thousands of pushes a second
    that is the whole event loop. APNs needs HTTP/2, which aiohttp lacks: it keeps httpx (one
    multiplexed connection, so no pool to walk).
    """

    def __init__(self, ca_file: str, timeout: float, public_only: bool = False) -> None:
        self.context = tls_context(ca_file)
        self.timeout = timeout
        # Connect to public addresses only: checked on the addresses the connection is made
        # to, so a name that resolves differently a second time (DNS rebinding) gains nothing.
        self.public_only = public_only
        self.session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        if self.session is None:  # on first use: a session belongs to the running loop
            resolver = PublicResolver() if self.public_only else None
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=self.context, limit=0, ttl_dns_cache=60, resolver=resolver
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # No cookies kept or sent: a Web Push endpoint (or a webhook's URL) is a
                # stranger's choice, and a jar would tie one user's pushes to another's and grow
                # with whatever cookies an endpoint sets.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self.session

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class Answer:
    """A push service's answer, as the senders read it (httpx.Response's names). Not an
    httpx.Response: building one (headers normalised, content streamed through decoders) was
    a tenth of a Web Push's CPU."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # case-insensitive
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


async def exchange(http: httpx.AsyncClient | Http1, method: str, url: str, **kw: Any) -> Answer:
    """One request, its answer read up to MAX_ANSWER bytes: a Web Push endpoint is the
    device's choice, and must not be able to make Herald read gigabytes. Failures raise
    httpx's exceptions whichever client sent it, so senders handle one kind."""
    if isinstance(http, Http1):
        return await _exchange1(http, method, url, **kw)
    async with http.stream(method, url, **kw) as streamed:
        body = bytearray()
        async for chunk in streamed.aiter_raw():
            body += chunk
            if len(body) >= MAX_ANSWER:
                break
        headers = [(k, v) for k, v in streamed.headers.multi_items() if k != "content-encoding"]
        return Answer(streamed.status_code, httpx.Headers(headers), bytes(body[:MAX_ANSWER]))


async def _exchange1(
    http: Http1,
    method: str,
    url: str,
    content: bytes | None = None,
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    parsed = _urls.get(url)
    if parsed is None:  # parsed once per endpoint: parsing was a tenth of a push's CPU
        try:
            httpx.URL(url)
        except httpx.InvalidURL as exc:  # registered before a stricter check: never works
            raise httpx.UnsupportedProtocol(f"invalid URL: {exc}") from exc
        try:
            parsed = yarl.URL(url)
        except ValueError as exc:
            raise httpx.UnsupportedProtocol(f"invalid URL: {exc}") from exc
        if len(_urls) >= MAX_URLS:
            _urls.clear()
        _urls[url] = parsed
    try:
        async with http.open().request(
            method,
            parsed,
            data=content if content is not None else data,
            headers=headers,
            allow_redirects=False,  # a redirect could lead anywhere, a private address too
        ) as answer:
            body = bytearray()
            async for chunk in answer.content.iter_chunked(MAX_ANSWER):
                body += chunk
                if len(body) >= MAX_ANSWER:
                    break
            kept = CIMultiDict(
                (k, v)
                for k, v in answer.headers.items()
                if k.lower() != "content-encoding" and v.isascii()  # as httpx took them
            )
            return Answer(answer.status, kept, bytes(body[:MAX_ANSWER]))
    except TimeoutError as exc:
        raise httpx.ReadTimeout(type(exc).__name__, request=httpx.Request(method, url)) from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise httpx.ConnectError(type(exc).__name__, request=httpx.Request(method, url)) from exc


class PublicResolver(aiohttp.ThreadedResolver):
    """Resolves names, refusing any that resolve to a non-public address (see guard.py)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        if any(not guard.public_address(r["host"]) for r in found):
            raise OSError(f"{host} resolves to a private address")
        return found
