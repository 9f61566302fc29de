"""`POST …/notifications`, the hot path, as a raw ASGI handler in front of the Starlette router.

Posting is what app servers do thousands of times a second, and every microsecond of framework
on this path is paid for in throughput: Starlette's middleware stack, router and Request/Response
objects cost more than validating and durably storing the notification. So this one operation
reads the ASGI scope directly and writes the response itself, while keeping exactly the same
checks, errors and headers as the routed endpoints (which share the helpers it calls).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.types import Receive, Scope, Send

from herald.access import Caller
from herald.api import schemas
from herald.api.errors import error_body, error_headers, request_id
from herald.api.requests import (
    MINIMAL_APPLIED,
    check_body_headers,
    decode_body,
    feed_urls,
    wants_minimal,
)
from herald.errors import Conflict, HeraldError, InvalidRequest, PayloadTooLarge
from herald.model import Notification
from herald.store import Once, Remembered

if TYPE_CHECKING:
    from herald.service import Services

log = logging.getLogger("herald.api")

Render = Callable[[Notification, bool], Remembered]

# `…/activities` is the seed page's own example (a defect of that page, but the request people
# copy first): an alias of create, and of nothing else.
PATH = re.compile(r"/(beta|v1\.0)/(?:me|users/([^/]+))/(?:notifications|activities)/?")
# The request headers this handler reads; everything else is ignored (as the router would).
WANTED = {
    b"authorization",
    b"content-type",
    b"content-length",
    b"content-encoding",
    b"idempotency-key",
    b"client-request-id",
    b"if-modified-since",
    b"if-range",
    b"prefer",
    b"x-uns-id",
}


class Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


def match(scope: Scope) -> tuple[str, str | None] | None:
    """(version, user from the path or None for /me) if this is a POST …/notifications."""
    if scope["method"] != "POST":
        return None
    m = PATH.fullmatch(scope["path"])
    if m is None:
        return None
    # scope["path"] is already percent-decoded by the server, as the router sees it too.
    return m.group(1), m.group(2)


class Ingest:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, version: str, user: str | None
    ) -> None:
        start = time.perf_counter()
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in WANTED}
        try:
            answer = await self._create(scope, receive, headers, version, user)
        except HeraldError as exc:
            answer = Answer(exc.status, error_body(exc, scope), error_headers(exc))
        except Exception:
            log.exception("unhandled error", extra={"path": scope["path"]})
            failure = HeraldError("An unexpected error occurred.")
            answer = Answer(failure.status, error_body(failure, scope))
        else:
            if wants_minimal(headers.get("prefer")):
                answer = Answer(204, b"", answer.headers | MINIMAL_APPLIED)
        await self._send(send, scope, answer, headers.get("client-request-id"))
        self.services.metrics.observe("create", "POST", answer.status, time.perf_counter() - start)

    async def _create(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
        version: str,
        user: str | None,
    ) -> Answer:
        s = self.services
        caller = await s.access.caller(headers.get("authorization"), user, headers.get("x-uns-id"))
        body = await self._read(receive, headers)
        key = headers.get("idempotency-key")
        if key is None:
            return await self._store(caller, body, version)
        return await self._idempotent(caller, body, version, key, scope["path"])

    async def _read(self, receive: Receive, headers: dict[str, str]) -> bytes:
        limit = self.services.settings.max_body_bytes
        check_body_headers(headers.get, limit)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("The client disconnected before sending the body.")
            body += message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            if not message.get("more_body", False):
                break
        return decode_body(body, headers.get("content-encoding", "identity"), limit)

    async def _store(self, c: Caller, body: bytes, version: str) -> Answer:
        s = self.services
        content = schemas.content(body, s.feed.clock(), s.limits, c.app.host_name)
        n, created = await s.feed.post(c.user_id, c.app.host_name, content, c.device)
        feed, context = feed_urls(s.settings.base_url, version, c.user_id)
        headers = {"ETag": schemas.etag(n)}
        if created:
            headers["Location"] = f"{feed}/{n.id}"  # ids are GUIDs: nothing to escape
        body = schemas.encode_entity(n, f"{context}/$entity")
        return Answer(201 if created else 200, body, headers)

    def _render(self, c: Caller, version: str, fingerprint: str) -> Render:
        """How the answer to a post with a key is made from the notification as stored (as
        `_store` makes it)."""
        feed, context = feed_urls(self.services.settings.base_url, version, c.user_id)

        def render(n: Notification, created: bool) -> Remembered:
            body = schemas.encode_entity(n, f"{context}/$entity")
            location = f"{feed}/{n.id}" if created else None
            return Remembered(fingerprint, 201 if created else 200, body, location)

        return render

    async def _idempotent(
        self, c: Caller, body: bytes, version: str, key: str, path: str
    ) -> Answer:
        """Same key + same body → the first answer again; same key + other body → 409.

        The answer is recorded in the transaction that stores the notification (`put_once`), so
        a crash or a lost connection leaves both or neither: a retry never posts twice."""
        s = self.services
        if not 0 < len(key) <= 255 or not key.isprintable():
            raise InvalidRequest(
                "Idempotency-Key must be 1 to 255 printable characters.", target="Idempotency-Key"
            )
        scope = f"{c.app.client_id}:{c.user_id}"  # a client id has no colon
        fingerprint = hashlib.sha256(path.encode() + b"\x00" + body).hexdigest()
        async with s.idempotency_lock(scope, key):
            now = s.feed.clock()
            seen = await s.idempotency.recall(scope, key, now)
            if seen is None:
                content = schemas.content(body, now, s.limits, c.app.host_name)
                render = self._render(c, version, fingerprint)
                once = Once(scope, key, fingerprint, now + s.idempotency_ttl, render)
                seen = await s.feed.post_once(c.user_id, c.app.host_name, content, once, c.device)
            if seen.fingerprint != fingerprint:
                raise Conflict("This Idempotency-Key was already used with a different request.")
            return _answer(seen)

    @staticmethod
    async def _send(send: Send, scope: Scope, answer: Answer, client_rid: str | None) -> None:
        raw: list[tuple[bytes, bytes]] = [(b"request-id", request_id(scope).encode())]
        if answer.status != 204:  # a 204 has neither (RFC 9110 §8.6)
            raw.append((b"content-type", b"application/json"))
            raw.append((b"content-length", str(len(answer.body)).encode()))
        if client_rid is not None:
            raw.append((b"client-request-id", client_rid.encode("latin-1")))
        raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in answer.headers.items()]
        start: dict[str, Any] = {"type": "http.response.start", "status": answer.status}
        start["headers"] = raw
        await send(start)
        await send({"type": "http.response.body", "body": answer.body})


def _answer(r: Remembered) -> Answer:
    """The response for a post's answer, first time or replayed: the same headers either way."""
    headers = {"Location": r.location} if r.location else {}
    etag = msgspec.json.decode(r.body).get("@odata.etag")
    if etag:
        headers["ETag"] = etag
    return Answer(r.status, r.body, headers)
