"""The one place where failures become Graph error responses, plus the request-id middleware."""

from __future__ import annotations

import itertools
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.errors import (
    HeraldError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
)

log = logging.getLogger("herald.api")

_HTTP_TO_ERROR: dict[int, type[HeraldError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


class _Inner(msgspec.Struct):
    request_id: str = msgspec.field(name="request-id")
    client_request_id: str | None = msgspec.field(name="client-request-id")
    date: str


class _Detail(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    innerError: _Inner
    target: str | None = None


class _Body(msgspec.Struct):
    error: _Detail


# Request ids are GUID-shaped: a random per-process prefix and a counter. Unique without a
# syscall per request (uuid4 reads os.urandom each time).
_PREFIX = uuid.uuid4().hex[:20]
_COUNTER = itertools.count()


def request_id(scope: Scope) -> str:
    state: dict[str, Any] = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        p, n = _PREFIX, next(_COUNTER) & 0xFFFF_FFFF_FFFF
        rid = state["request_id"] = f"{p[:8]}-{p[8:12]}-{p[12:16]}-{p[16:20]}-{n:012x}"
    return str(rid)


def error_body(exc: HeraldError, scope: Scope) -> bytes:
    headers = dict(scope.get("headers") or [])
    client_rid = headers.get(b"client-request-id")
    inner = _Inner(
        request_id=request_id(scope),
        client_request_id=client_rid.decode("latin-1") if client_rid else None,
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return msgspec.json.encode(_Body(_Detail(exc.code, exc.message, inner, exc.target)))


def error_headers(exc: HeraldError) -> dict[str, str]:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if exc.status >= 500:
        log.error("request failed", extra={"code": exc.code, "error": exc.message})
    return headers


def error_response(exc: HeraldError, scope: Scope) -> Response:
    headers = error_headers(exc)
    return Response(
        error_body(exc, scope), exc.status, headers=headers, media_type="application/json"
    )


async def herald_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HeraldError)
    return error_response(exc, request.scope)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in the Graph shape."""
    assert isinstance(exc, HTTPException)
    kind = _HTTP_TO_ERROR.get(exc.status_code, HeraldError)
    message = {
        404: f"Resource not found for the segment '{request.url.path}'.",
        405: f"The HTTP method '{request.method}' is not allowed for this resource.",
    }.get(exc.status_code, str(exc.detail))
    response = error_response(kind(message), request.scope)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    response = error_response(HeraldError("An unexpected error occurred."), request.scope)
    # Starlette answers this one outside the request-id middleware: add the header here.
    response.headers["request-id"] = request_id(request.scope)
    return response


class RequestIdMiddleware:
    """Adds `request-id` to every response and echoes `client-request-id` (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope).encode()
        client_rid = next((v for k, v in scope["headers"] if k == b"client-request-id"), None)

        async def send_with_ids(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"request-id", rid))
                if client_rid is not None:
                    headers.append((b"client-request-id", client_rid))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_ids)
