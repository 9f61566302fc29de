"""`GET …/notifications/delta`: Graph delta query over the change log.

Tokens are change-log positions. The first sync reads the position first and then pages through
the feed by id, so anything that changes while it pages has a later position and comes again in
the next delta round: an item may repeat, never go missing. Later rounds read the log after the
token; `$skiptoken` carries the same kind of cursor between pages of one round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald.access import Caller
from herald.api import odata, schemas, wire
from herald.api.requests import caller, context, json_response, services
from herald.errors import Gone, InvalidRequest
from herald.model import Change
from herald.query import Comparison, Order, Query

OPTIONS = ("$deltatoken", "$skiptoken", "$select")
# `$deltatoken=latest`: no items, just a deltaLink at the current position (Graph's way to start
# tracking changes without reading the feed).
LATEST = "latest"
# Where a page leaves the device in the change log (not sent): its subscription's seen position,
# which the iOS fallback checks (docs/push.md).
REACHED = "\0reached"
MAX_POSITION = 2**63 - 1
# First-sync cursors: "<position>.<last id seen>"; change cursors: "<position>".
SNAPSHOT_TOKEN = re.compile(r"([0-9]{1,19})\.([0-9a-fA-F-]{1,64})")
PREFER_PAGE = re.compile(r"odata\.maxpagesize\s*=\s*([0-9]{1,6})", re.IGNORECASE)


@dataclass(frozen=True)
class Round:
    """What one delta request asks for: its token (at most one) and its `$select`."""

    deltatoken: str | None = None
    skiptoken: str | None = None
    select: tuple[str, ...] | None = None


def _options(request: Request) -> Round:
    given: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        name = odata.option_name(key)
        if name is None:
            continue  # not an OData option: ignored, as on every endpoint
        if name not in OPTIONS:
            raise InvalidRequest(
                f"Query option '{key[:64]}' is not supported on delta: it takes $select, and "
                "the $skiptoken/$deltatoken of the @odata.nextLink and @odata.deltaLink it gave.",
                target=key[:64],
            )
        if name in given:
            raise InvalidRequest(f"Query option '{name}' is given twice.", target=name)
        given[name] = value
    if "$deltatoken" in given and "$skiptoken" in given:
        raise InvalidRequest("Give either $deltatoken or $skiptoken.", target="$skiptoken")
    select = given.get("$select")
    if select is not None and not select.strip():
        raise InvalidRequest("Query option '$select' must not be empty.", target="$select")
    return Round(
        given.get("$deltatoken"),
        given.get("$skiptoken"),
        odata.parse_select(select) if select is not None else None,
    )


def _page_size(request: Request) -> tuple[int, bool]:
    """(page size, whether the client asked for it with Prefer: odata.maxpagesize)."""
    s = services(request).settings
    m = PREFER_PAGE.search(request.headers.get("prefer", ""))
    if m is None:
        return s.default_page_size, False
    return max(1, min(int(m.group(1)), s.max_page_size)), True


def _position(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_POSITION:
        raise InvalidRequest(f"{name} is not a token this server issued.", target=name)
    return int(text)


async def delta(request: Request) -> Response:
    c = await caller(request)
    ask = _options(request)
    size, preferred = _page_size(request)
    body: dict[str, Any]
    if ask.deltatoken == LATEST:
        _, head = await services(request).changelog.horizon(c.user_id)
        body = _body(request, c, [])
        body["@odata.deltaLink"] = _link(request, ask, "$deltatoken", str(head))
    elif ask.deltatoken is not None:
        after = _position(ask.deltatoken, "$deltatoken")
        body = await _changes(request, c, ask, after, size)
    elif ask.skiptoken is not None:
        m = SNAPSHOT_TOKEN.fullmatch(ask.skiptoken)
        if m is not None:
            position = _position(m.group(1), "$skiptoken")
            body = await _snapshot(request, c, ask, position, m.group(2), size)
        else:
            body = await _changes(request, c, ask, _position(ask.skiptoken, "$skiptoken"), size)
    else:
        _, head = await services(request).changelog.horizon(c.user_id)
        body = await _snapshot(request, c, ask, head, None, size)
    reached = body.pop(REACHED, None)
    if c.device is not None and reached:  # the device has fetched everything up to here
        await services(request).changelog.seen(c.device, reached)
    headers = {"Preference-Applied": f"odata.maxpagesize={size}"} if preferred else None
    return json_response(wire.encode(body), headers=headers)


async def _snapshot(
    request: Request, c: Caller, ask: Round, position: int, after_id: str | None, size: int
) -> dict[str, Any]:
    """One page of the first sync: the live feed by id, as of (at least) `position`."""
    s = services(request)
    _, head = await s.changelog.horizon(c.user_id)
    if after_id is not None:  # a token: the sync began at `position`, maybe on a lost history
        await _not_lost(request, c, position)
    if position > head:
        raise InvalidRequest("$skiptoken is not a token this server issued.", target="$skiptoken")
    where = Comparison("id", "gt", after_id) if after_id is not None else None
    query = Query(filter=where, order=(Order("id"),), top=size + 1)
    page = await s.feed.list(c.user_id, c.app.host_name, query)
    items = page.items[:size]
    body = _body(request, c, [schemas.to_builtins(n, ask.select) for n in items])
    if len(page.items) > size:
        body["@odata.nextLink"] = _link(request, ask, "$skiptoken", f"{position}.{items[-1].id}")
    else:
        body["@odata.deltaLink"] = _link(request, ask, "$deltatoken", str(position))
        body[REACHED] = position
    return body


async def _changes(
    request: Request, c: Caller, ask: Round, after: int, size: int
) -> dict[str, Any]:
    """One page of changes after `after`, collapsed by notification."""
    s = services(request)
    pruned, head = await s.changelog.horizon(c.user_id)
    if after < pruned:
        raise Gone(
            "The delta token is older than the retained history: start a new sync with "
            "GET …/notifications/delta without a token."
        )
    await _not_lost(request, c, after)
    if after > head:
        raise InvalidRequest(
            "The token is ahead of the feed: not one this server issued.", target="$deltatoken"
        )
    changes = await s.changelog.changes(c.user_id, c.app.host_name, after, size)
    items = _collapse(changes, ask.select)
    body = _body(request, c, items)
    if len(changes) == size:
        body["@odata.nextLink"] = _link(request, ask, "$skiptoken", str(changes[-1].position))
        body[REACHED] = changes[-1].position
    else:
        # Everything up to `head` (read before the log) has been seen, whichever app it was.
        last = max(head, changes[-1].position if changes else after)
        body["@odata.deltaLink"] = _link(request, ask, "$deltatoken", str(last))
        body[REACHED] = last
    return body


async def _not_lost(request: Request, c: Caller, position: int) -> None:
    """410 for a token whose position the store skipped on a new history (a failover that lost
    changes): the device's state holds changes that are gone."""
    if await services(request).changelog.lost(c.user_id, position):
        raise Gone(
            "The delta token was issued before the database failed over and lost changes: start"
            " a new sync with GET …/notifications/delta without a token."
        )


def _collapse(changes: list[Change], select: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """The final state of each notification that changed, in order of its last change."""
    latest: dict[str, Change] = {}
    for change in changes:
        latest.pop(change.notification_id, None)  # re-insert: order by the last change
        latest[change.notification_id] = change
    items = []
    for change in latest.values():
        n = change.notification
        if n is None:
            items.append({"id": change.notification_id, "@removed": {"reason": "deleted"}})
        else:
            items.append(schemas.to_builtins(n, select))
    return items


def _body(request: Request, c: Caller, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"@odata.context": context(request, c, "/delta"), "value": items}


def _link(request: Request, ask: Round, name: str, value: str) -> str:
    """A next or delta link: the same path (whichever of Graph's spellings the client used),
    the new token, and the same `$select` (a round keeps the shape it started with)."""
    base = services(request).settings.base_url
    query = f"{name}={quote(value, safe='.-')}"
    if ask.select is not None:
        query += f"&$select={quote(','.join(ask.select), safe=',')}"
    return f"{base}{request.url.path}?{query}"


def routes() -> list[BaseRoute]:
    # Graph addresses delta as a function: `delta()`, or qualified, `microsoft.graph.delta()`
    # (what SDKs generate); `delta` alone is the short form Herald's links use.
    table: list[BaseRoute] = []
    for prefix in ("/me", "/users/{user}"):
        for name in ("delta", "delta()", "microsoft.graph.delta()"):
            table.append(Route(f"{prefix}/notifications/{name}", delta, methods=["GET"]))
    return table
