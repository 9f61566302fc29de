"""`POST /$batch`: Graph JSON batching. Each inner request runs through the whole app in process,
with the outer request's Authorization, so it gets exactly the checks a direct call gets."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message

from herald.api.requests import read_body, version
from herald.errors import InvalidRequest

log = logging.getLogger("herald.api")
MAX_REQUESTS = 20
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")  # an HTTP field name (RFC 9110)
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]{0,8192}")  # Latin-1, no control characters
METHODS = {"GET", "POST", "PATCH", "PUT", "DELETE"}
NESTED = "A batch cannot contain another batch."
INNER = "herald.batch"  # scope key marking a request run from inside a batch


class InnerRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    method: str
    url: str
    headers: dict[str, str] | None = None
    body: Any = None
    dependsOn: list[str] | None = None
    # msgraph-core for Python spells it in snake case (BatchRequestItem.serialize); Graph
    # accepts both.
    depends_on: list[str] | None = None

    @property
    def depends(self) -> list[str]:
        return (self.dependsOn or []) + (self.depends_on or [])

    @property
    def header_map(self) -> dict[str, str]:
        return self.headers or {}


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    requests: list[InnerRequest]


_DECODER = msgspec.json.Decoder(BatchIn)


def _validate(batch: BatchIn) -> None:
    if not 1 <= len(batch.requests) <= MAX_REQUESTS:
        raise InvalidRequest(
            f"A batch holds 1 to {MAX_REQUESTS} requests; got {len(batch.requests)}.",
            target="requests",
        )
    seen: set[str] = set()
    for r in batch.requests:
        if not r.id or r.id in seen:
            raise InvalidRequest(
                f"Request ids must be unique and non-empty: {r.id!r}.", target="id"
            )
        if r.method.upper() not in METHODS:
            raise InvalidRequest(
                f"Unsupported method {r.method!r} in request {r.id}.", target="method"
            )
        bad = [
            k for k, v in r.header_map.items() if not (_TOKEN.fullmatch(k) and _VALUE.fullmatch(v))
        ]
        if bad:
            raise InvalidRequest(
                f"Request {r.id} has an invalid header {bad[0][:40]!r}.", target="headers"
            )
        if _names_batch(r.url):
            raise InvalidRequest(NESTED, target="url")
        if r.dependsOn and r.depends_on:
            raise InvalidRequest(
                f"Request {r.id} has both dependsOn and depends_on; give one.", target="dependsOn"
            )
        if isinstance(r.body, str):
            _base64(r.body, r.id)
        missing = [d for d in r.depends if d not in seen]
        if missing:
            raise InvalidRequest(
                f"Request {r.id} depends on {missing[0]!r}, which is not an earlier request.",
                target="dependsOn",
            )
        seen.add(r.id)


def _names_batch(url: str) -> bool:
    """Whether an inner URL names `$batch` in any spelling: percent-encoded (even more than
    once), in any case, absolute, after any number of slashes."""
    path, previous = url.partition("?")[0].partition("#")[0], None
    while path != previous:
        previous, path = path, unquote(path)
    return any(segment.strip().lower() == "$batch" for segment in path.split("/"))


async def handle(request: Request) -> Response:
    if request.scope.get(INNER):  # whatever spelling got past _validate
        raise InvalidRequest(NESTED, target="url")
    # Room for 20 requests of the largest size a single request may have.
    limit = request.app.state.services.settings.max_body_bytes * MAX_REQUESTS
    try:
        batch = _DECODER.decode(await read_body(request, limit))
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid batch body: {exc}.", target="requests") from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The batch body is not valid JSON: {exc}.", target="body") from exc
    except RecursionError:
        raise InvalidRequest("The batch body is nested too deeply.", target="body") from None
    _validate(batch)
    results: dict[str, dict[str, Any]] = {}
    if any(r.depends for r in batch.requests):
        for r in batch.requests:
            results[r.id] = await _run_after(request, r, results)
    else:
        answers = await asyncio.gather(*(_run(request, r) for r in batch.requests))
        results = {r.id: a for r, a in zip(batch.requests, answers, strict=True)}
    body = {"responses": [results[r.id] for r in batch.requests]}
    return Response(msgspec.json.encode(body), media_type="application/json")


async def _run_after(
    request: Request, inner: InnerRequest, done: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    failed = [d for d in inner.depends if done[d]["status"] >= 400]
    if failed:
        error = {"code": "failedDependency", "message": f"Request {failed[0]} failed."}
        return {"id": inner.id, "status": 424, "body": {"error": error}}
    return await _run(request, inner)


def target(url: str) -> tuple[str | None, str]:
    """(API version, path and query below it) of an inner request's URL.

    Relative URLs are below the batch's own version (`/me/notifications`, or without the slash).
    An absolute URL (msgraph-core sends `https://host/beta/me/notifications`) names its version
    in its path; its scheme and host are not checked, since the request is served here whatever
    host it names."""
    if not url.lower().startswith(("http://", "https://")):
        return None, url if url.startswith("/") else "/" + url
    parts = urlsplit(url)
    version, _, rest = parts.path.lstrip("/").partition("/")
    if version not in VERSIONS:
        raise InvalidRequest(
            f"The absolute URL {url[:80]!r} is not below /beta/ or /v1.0/.", target="url"
        )
    return version, "/" + rest + (f"?{parts.query}" if parts.query else "")


VERSIONS = ("beta", "v1.0")


def _base64(text: str, rid: str) -> bytes:
    """A body given as a string: base64 (OData JSON batch format §19.1; msgraph-core sends
    every body that is not a JSON object so), standard or URL-safe, padded or not."""
    squeezed = "".join(text.split())
    try:
        return base64.b64decode(
            squeezed.replace("-", "+").replace("_", "/") + "=" * (-len(squeezed) % 4),
            validate=True,
        )
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"The body of request {rid} is a string but not base64: send JSON bodies as JSON "
            "objects, anything else base64-encoded.",
            target="body",
        ) from None


async def _run(outer: Request, inner: InnerRequest) -> dict[str, Any]:
    named, path = target(inner.url)
    url = urlsplit(path)
    api = named or version(outer)
    headers = {k.lower(): v for k, v in inner.header_map.items()}
    body = b""
    if isinstance(inner.body, str):
        body = _base64(inner.body, inner.id)
    elif inner.body is not None:
        body = msgspec.json.encode(inner.body)
    if body:
        headers.setdefault("content-type", "application/json")
    for name in ("authorization", "client-request-id"):
        if name in outer.headers and name not in headers:
            headers[name] = outer.headers[name]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": inner.method.upper(),
        "scheme": outer.url.scheme,
        "server": outer.scope.get("server"),
        "client": outer.scope.get("client"),
        # ASGI paths are percent-decoded, raw_path is not: as a server would pass them.
        "path": f"/{api}{unquote(url.path)}",
        "raw_path": f"/{api}{url.path}".encode("latin-1", "replace"),
        "root_path": "",
        "query_string": url.query.encode(),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "state": {},
        INNER: True,
    }
    return await _call(outer, scope, body, inner.id)


async def _call(outer: Request, scope: dict[str, Any], body: bytes, rid: str) -> dict[str, Any]:
    sent = False
    started: Message = {}
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    app = outer.app.state.asgi
    try:
        await app(scope, receive, send)
    except Exception:
        # The error middleware has already answered 500 for this request (and re-raised);
        # the batch goes on, so the other responses, written or not, are not lost.
        log.exception("inner batch request failed", extra={"path": scope["path"]})
        if not started:
            started = {"status": 500, "headers": []}
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in started.get("headers", [])}
    headers.pop("content-length", None)
    raw = b"".join(chunks)
    result: dict[str, Any] = {"id": rid, "status": started.get("status", 500), "headers": headers}
    if raw:
        is_json = headers.get("content-type", "").startswith("application/json")
        result["body"] = json.loads(raw) if is_json else raw.decode("utf-8", "replace")
    return result


def routes() -> list[BaseRoute]:
    return [Route("/$batch", handle, methods=["POST"])]
