"""The Channel protocol, the outcome of one push, and what every channel shares: the message a
device is sent, its size limit, the HTTP client and the keyring of app credentials."""

from __future__ import annotations

import base64
import enum
import hashlib
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import httpx
import msgspec
from aiohttp.abc import ResolveResult

from herald.delivery import guard
from herald.model import Message, Provider, PushChannel, PushKind
from herald.store import Store


class Result(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # a transient failure: try again later (after `retry_after` if given)
    GONE = "gone"  # the channel no longer exists
    REJECTED = "rejected"  # the push service refused this message: never retried


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. `credentials`: the provider refused Herald's credentials (or
    none are configured): an operator has to act, so it is reported loudly."""

    result: Result
    reason: str = ""
    retry_after: float | None = None
    credentials: bool = False
    status: int | None = None


DELIVERED = Outcome(Result.DELIVERED)
MAX_RETRY_AFTER = 86_400.0  # a provider asking for longer is treated as asking for a day


class Channel(Protocol):
    """Sends messages to one push service. Guarantees:

    * `send` renders `message` for its platform (a pure function of the message) and makes one
      request (plus a token request when its cached access token needs renewing).
    * It returns an Outcome for everything the service answers, and for timeouts and connection
      failures (RETRY); it never raises for the service's behaviour.
    * It never logs or returns a credential or token.
    """

    provider: Provider

    async def send(self, app: str, channel: PushChannel, message: Message) -> Outcome: ...

    async def close(self) -> None: ...


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
                auto_decompress=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self.session

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


async def exchange(
    http: httpx.AsyncClient | Http1, method: str, url: str, **kw: Any
) -> httpx.Response:
    """One request, its answer read up to MAX_ANSWER bytes: a Web Push endpoint is the
    device's choice, and must not be able to make Herald read gigabytes. Failures raise
    httpx's exceptions whichever client sent it, so channels handle one kind."""
    if isinstance(http, Http1):
        return await _exchange1(http, method, url, **kw)
    async with http.stream(method, url, **kw) as streamed:
        body = bytearray()
        async for chunk in streamed.aiter_raw():
            body += chunk
            if len(body) >= MAX_ANSWER:
                break
        headers = [(k, v) for k, v in streamed.headers.multi_items() if k != "content-encoding"]
        return httpx.Response(
            streamed.status_code,
            headers=headers,
            content=bytes(body[:MAX_ANSWER]),
            request=streamed.request,
        )


async def _exchange1(
    http: Http1,
    method: str,
    url: str,
    content: bytes | None = None,
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    try:
        request = httpx.Request(method, url)
    except httpx.InvalidURL as exc:  # registered before a stricter check: it can never work
        raise httpx.UnsupportedProtocol(f"invalid URL: {exc}") from exc
    try:
        async with http.open().request(
            method,
            url,
            data=content if content is not None else data,
            headers=headers,
            allow_redirects=False,  # a redirect could lead anywhere, a private address too
        ) as answer:
            body = bytearray()
            async for chunk in answer.content.iter_chunked(MAX_ANSWER):
                body += chunk
                if len(body) >= MAX_ANSWER:
                    break
            return httpx.Response(
                answer.status,
                headers=[
                    (k, v)
                    for k, v in answer.headers.items()
                    if k.lower() != "content-encoding" and v.isascii()  # httpx takes only ASCII
                ],
                content=bytes(body[:MAX_ANSWER]),
                request=request,
            )
    except TimeoutError as exc:
        raise httpx.ReadTimeout(type(exc).__name__, request=request) from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise httpx.ConnectError(type(exc).__name__, request=request) from exc


class PublicResolver(aiohttp.ThreadedResolver):
    """Resolves names, refusing any that resolve to a non-public address (see guard.py)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        if any(not guard.public_address(r["host"]) for r in found):
            raise OSError(f"{host} resolves to a private address")
        return found


def missing(service: str, app: str) -> Outcome:
    """The app has no credentials for this push service: an operator must act."""
    return Outcome(Result.RETRY, f"no {service} credentials for {app}", credentials=True)


def failure(exc: Exception) -> Outcome:
    """The outcome of a request that got no answer (an unusable URL: rejected)."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return Outcome(Result.REJECTED, str(exc)[:200])
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    return Outcome(Result.RETRY, f"{kind}: {type(exc).__name__}")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/bad."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return min(float(value[:12]), MAX_RETRY_AFTER)
    try:
        seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def by_status(status: int, headers: Mapping[str, str], reason: str) -> Outcome:
    """The usual reading of a push service's status (each channel refines it first)."""
    if 200 <= status < 300:
        return DELIVERED
    if status in (404, 410):
        return Outcome(Result.GONE, reason, status=status)
    if status in (401, 403):
        return Outcome(Result.RETRY, reason, retry_after(headers), credentials=True, status=status)
    if status == 429 or status >= 500:
        return Outcome(Result.RETRY, reason, retry_after(headers), status=status)
    return Outcome(Result.REJECTED, reason, status=status)


# -- the message ---------------------------------------------------------------------------------


def document(message: Message, truncated: bool = False, visual: bool = False) -> dict[str, Any]:
    """The JSON object every channel carries (docs/push.md). `truncated`: content dropped (with
    `visual`: only rawContent; the title and body stay)."""
    out: dict[str, Any] = {
        "type": message.kind.value,
        "position": message.position,
        "id": message.notification_id,
    }
    if message.kind is not PushKind.REMOVE:
        out["appNotificationId"] = message.app_notification_id
        if message.group_name is not None:
            out["groupName"] = message.group_name
        payload = message.payload
        if payload is not None:
            if payload.visual_content is not None and (visual or not truncated):
                out["title"] = payload.visual_content.title
                if payload.visual_content.body is not None:
                    out["body"] = payload.visual_content.body
            if payload.raw_content is not None and not truncated:
                out["rawContent"] = payload.raw_content
        out["priority"] = message.priority.value
        out["readState"] = message.read_state.value
        out["userActionState"] = message.user_action_state.value
        if message.display_time_to_live is not None:
            out["displayTimeToLive"] = message.display_time_to_live
        out["expirationDateTime"] = iso(message.expires)
    if truncated:
        out["truncated"] = True
    return out


def shortened(message: Message) -> Iterator[dict[str, Any]]:
    """The message from whole to shoulder tap, for a channel to send the first that fits: whole;
    without rawContent, if it also has a title and body to keep; without any content."""
    yield document(message)
    payload = message.payload
    if payload is not None and payload.raw_content is not None and payload.visual_content:
        yield document(message, truncated=True, visual=True)
    yield document(message, truncated=True)


def fitted(message: Message, limit: int, overhead: int = 0) -> bytes:
    """The message as JSON, shortened (docs/push.md) if it is longer than `limit - overhead`."""
    for doc in shortened(message):
        body = msgspec.json.encode(doc)
        if len(body) + overhead <= limit:
            break
    return body


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_left(expires: datetime, cap: int) -> int:
    return max(0, min(cap, int(expires.timestamp() - time.time())))


def collapse_key(notification_id: str, size: int) -> str:
    """A collapse key/tag of at most `size` base64url characters for a notification: its id
    (a replace keeps the id) if it fits, else a digest of it."""
    if len(notification_id) <= size and all(c.isalnum() or c in "-_" for c in notification_id):
        return notification_id
    digest = base64.urlsafe_b64encode(hashlib.sha256(notification_id.encode()).digest())
    return digest.decode().rstrip("=")[:size]


# -- credentials ---------------------------------------------------------------------------------


MISS_TTL = 2.0  # seconds a missing credential is remembered


class Keyring:
    """App push credentials from the store, cached briefly: `herald app push-set` (another
    process) takes effect within `ttl` seconds, or at once after a credentials failure."""

    def __init__(self, store: Store, ttl: float = 30.0) -> None:
        self.store = store
        self.ttl = ttl
        self.cache: dict[str, tuple[float, dict[str, bytes]]] = {}

    async def get(self, app: str, kind: str) -> bytes | None:
        hit = self.cache.get(app)
        age = time.monotonic() - hit[0] if hit is not None else 0.0
        # A missing credential is looked for again sooner: `herald app push-set` may come any
        # moment, and the retries waiting for it should not wait out the whole ttl.
        if hit is None or age > self.ttl or (kind not in hit[1] and age > MISS_TTL):
            hit = (time.monotonic(), await self.store.get_push_credentials(app))
            self.cache[app] = hit
        return hit[1].get(kind)

    async def ensure(self, app: str, kind: str, make: Any) -> bytes:
        """The credential, created with `make()` if the app has none (first writer wins)."""
        found = await self.get(app, kind)
        if found is not None:
            return found
        stored = await self.store.put_push_credentials(app, kind, make(), replace=False)
        self.forget(app)
        return stored

    def forget(self, app: str) -> None:
        self.cache.pop(app, None)
