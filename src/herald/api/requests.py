"""What the endpoints share: reading a request (its services, caller, API version, body) and
writing a JSON response, and the URLs of a user's feed."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from herald.access import Caller
from herald.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from herald.service import Services

JSON = "application/json"
UNSUPPORTED_HEADERS = ("if-modified-since", "if-range")


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def caller(request: Request) -> Caller:
    user = request.path_params.get("user")
    headers = request.headers
    return await services(request).access.caller(
        headers.get("authorization"), user, headers.get("x-uns-id")
    )


def version(request: Request) -> str:
    return request.url.path.split("/", 2)[1]


def feed_urls(base_url: str, version: str, user_id: str) -> tuple[str, str]:
    """(the user's notifications URL, the @odata.context prefix for them)."""
    user = quote(user_id, safe="")
    return (
        f"{base_url}/{version}/users/{user}/notifications",
        f"{base_url}/{version}/$metadata#users('{user}')/notifications",
    )


def context(request: Request, c: Caller, suffix: str) -> str:
    base = services(request).settings.base_url
    return feed_urls(base, version(request), c.user_id)[1] + suffix


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status, headers=headers, media_type=JSON)


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The request body, checked for content type, encoding and size before it is parsed."""
    limit = limit or services(request).settings.max_body_bytes
    check_body_headers(request.headers.get, limit)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    return decode_body(body, request.headers.get("content-encoding", "identity"), limit)


def check_body_headers(header: Callable[[str], str | None], limit: int) -> None:
    """Refuse a body by its headers alone: unsupported headers, type, declared size."""
    for name in UNSUPPORTED_HEADERS:
        if header(name) is not None:
            raise InvalidRequest(f"The '{name}' header is not supported.", target=name)
    kind = (header("content-type") or "").split(";", 1)[0].strip().lower()
    if kind != JSON:
        raise UnsupportedMediaType("Content-Type must be application/json.")
    declared = header("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding, without letting a small bomb grow past `limit`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType("Content-Encoding must be gzip or deflate.")
    wbits = 31 if encoding == "gzip" else 15
    try:
        inflater = zlib.decompressobj(wbits)
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"The {encoding} body cannot be decoded.", target="body") from exc
    if len(data) > limit:
        raise PayloadTooLarge(f"The decoded request body is larger than {limit} bytes.")
    return data


# `Prefer: return=minimal` (RFC 7240, OData 4.01 §8.2.8.7): answer a write with 204 and no body.
_MINIMAL = re.compile(r"(?:^|[,;])\s*return\s*=\s*\"?minimal\"?\s*(?:$|[,;])", re.IGNORECASE)
MINIMAL_APPLIED = {"Preference-Applied": "return=minimal"}


def wants_minimal(prefer: str | None) -> bool:
    return prefer is not None and _MINIMAL.search(prefer) is not None
