"""`/me/notifications` and `/users/{user}/notifications`: the Graph notification resource."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald import fields
from herald.access import Caller
from herald.api import odata, schemas, wire
from herald.api.requests import (
    MINIMAL_APPLIED,
    caller,
    context,
    json_response,
    read_body,
    services,
    wants_minimal,
)
from herald.errors import (
    InvalidRequest,
    NotFound,
    PreconditionFailed,
)
from herald.model import Notification
from herald.query import Query


async def if_match(request: Request, c: Caller) -> int | None:
    """The version an If-Match header demands; None when absent or `*`.

    A list of tags matches if any does (RFC 9110): the current version is looked up, and the
    store then re-checks it, so a write that races in between still gets 412.
    """
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    versions = set()
    for tag in value.split(","):
        tag = tag.strip().removeprefix("W/").strip('"')
        if tag.isascii() and tag.isdigit() and len(tag) <= 18:
            versions.add(int(tag))
    if len(versions) == 1:
        return versions.pop()
    current = await services(request).feed.get(c.user_id, c.app.host_name, path_id(request))
    if current is not None and current.version in versions:
        return current.version
    raise PreconditionFailed(f"If-Match {value[:64]!r} does not match the current ETag.")


def entity(request: Request, c: Caller, n: Notification) -> Response:
    headers = {"ETag": schemas.etag(n)}
    if wants_minimal(request.headers.get("prefer")):
        return Response(status_code=204, headers=headers | MINIMAL_APPLIED)
    body = schemas.encode_entity(n, context(request, c, "/$entity"))
    return json_response(body, headers=headers)


def path_id(request: Request) -> str:
    """The notification id from the path; one that cannot exist is simply not found."""
    value: str = request.path_params["id"]
    if len(value) > 256 or not value.isprintable():
        raise NotFound(f"Notification {value[:64]!r} was not found.")
    return value


async def get_one(request: Request) -> Response:
    c = await caller(request)
    n = await services(request).feed.get(c.user_id, c.app.host_name, path_id(request))
    if n is None:
        raise NotFound(f"Notification '{path_id(request)}' was not found.")
    body = schemas.encode_entity(n, context(request, c, "/$entity"))
    return json_response(body, headers={"ETag": schemas.etag(n)})


async def patch_one(request: Request) -> Response:
    c = await caller(request)
    s = services(request)
    patch, read_only = schemas.state_patch(await read_body(request), s.feed.clock(), s.limits)
    if read_only:  # sent back from a GET: each must still be what is stored
        current = await s.feed.get(c.user_id, c.app.host_name, path_id(request))
        if current is None:
            raise NotFound(f"Notification '{path_id(request)}' was not found.")
        schemas.check_unchanged(read_only, current)
    n = await s.feed.update(
        c.user_id, c.app.host_name, path_id(request), patch, await if_match(request, c), c.device
    )
    return entity(request, c, n)


async def delete_one(request: Request) -> Response:
    c = await caller(request)
    await services(request).feed.delete(
        c.user_id, c.app.host_name, path_id(request), await if_match(request, c), c.device
    )
    return Response(status_code=204)


async def list_all(request: Request) -> Response:
    c = await caller(request)
    s = services(request)
    query = odata.parse_query(
        request.query_params.multi_items(),
        default_top=s.settings.default_page_size,
        max_top=s.settings.max_page_size,
    )
    asked = query.top
    page = await s.feed.list(c.user_id, c.app.host_name, _one_more(query))
    items = page.items[:asked]
    body: dict[str, Any] = {"@odata.context": context(request, c, "")}
    if page.total is not None:
        body["@odata.count"] = page.total
    body["value"] = [schemas.to_builtins(n, query.select) for n in items]
    if asked and len(page.items) > asked:
        body["@odata.nextLink"] = _next_link(request, query.skip + asked)
    return json_response(wire.encode(body))


def _one_more(query: Query) -> Query:
    # Ask for one extra row to learn whether a next page exists without a second query.
    return replace(query, top=query.top + 1)


def _next_link(request: Request, skip: int) -> str:
    items = request.query_params.multi_items()
    params = [(k, v) for k, v in items if odata.option_name(k) != "$skip"]
    params.append(("$skip", str(skip)))
    base = services(request).settings.base_url
    return f"{base}{request.url.path}?{urlencode(params, quote_via=quote, safe='$,')}"


async def count(request: Request) -> Response:
    c = await caller(request)
    given = odata.options(request.query_params.multi_items())
    unsupported = [k for k in given if k != "$filter"]
    if unsupported:
        raise InvalidRequest(
            f"Query option '{unsupported[0]}' is not supported on $count; use $filter.",
            target=unsupported[0],
        )
    text = given.get("$filter")
    filt = odata.parse_filter(text) if text is not None else None
    total = await services(request).feed.count(c.user_id, c.app.host_name, filt)
    return Response(str(total), media_type="text/plain")


async def delete_group(request: Request) -> Response:
    """`POST .../notifications/deleteGroup {"groupName": "..."}`: delete a whole group."""
    c = await caller(request)
    body = wire.decode_body(await read_body(request), _GROUP_DECODER)
    group = fields.required(body.groupName, "groupName", schemas.MAX_GROUP_LENGTH)
    deleted = await services(request).feed.delete_group(c.user_id, c.app.host_name, group, c.device)
    return json_response(wire.encode({"deletedCount": deleted}))


class _GroupIn(msgspec.Struct, forbid_unknown_fields=True):
    groupName: Any = None


_GROUP_DECODER = msgspec.json.Decoder(_GroupIn)


def routes() -> list[BaseRoute]:
    """Everything but POST …/notifications, which `api/ingest.py` serves ahead of the router."""
    table: list[BaseRoute] = []
    for prefix in ("/me", "/users/{user}"):
        base = f"{prefix}/notifications"
        table += [
            Route(base, list_all, methods=["GET"]),
            Route(f"{base}/$count", count, methods=["GET"]),
            Route(f"{base}/deleteGroup", delete_group, methods=["POST"]),
            Route(f"{base}/{{id}}", get_one, methods=["GET"]),
            Route(f"{base}/{{id}}", patch_one, methods=["PATCH"]),
            Route(f"{base}/{{id}}", delete_one, methods=["DELETE"]),
        ]
    return table
