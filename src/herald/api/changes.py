"""`GET /beta/notificationChanges`: the app-wide change feed, read from a cursor (docs/api.md
"Change feed"), for app servers that cannot receive webhooks.

Graph delta style: without a token, the feed from its oldest retained change; each page ends with
an `@odata.nextLink` (more follow at once) or an `@odata.deltaLink` (the end for now: call it
later for what comes next). `$deltatoken=latest` starts at the end without reading. Tokens are
opaque (`appfeed.token`); one older than the retained history answers 410 with a hint to start
again without a token.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald import appfeed
from herald.api import odata, wire
from herald.api.appcaller import app_caller
from herald.api.delta import PREFER_PAGE
from herald.api.requests import json_response, services, version
from herald.errors import Gone, InvalidRequest
from herald.store import FeedPage

OPTIONS = ("$deltatoken", "$skiptoken")
LATEST = "latest"
PATH = "/notificationChanges"


def _token(request: Request) -> tuple[str | None, str | None]:
    given: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        name = odata.option_name(key)
        if name is None:
            continue
        if name not in OPTIONS:
            raise InvalidRequest(
                f"Query option '{key[:64]}' is not supported here: it takes the $skiptoken and"
                " $deltatoken of the links it gave.",
                target=key[:64],
            )
        if name in given:
            raise InvalidRequest(f"Query option '{name}' is given twice.", target=name)
        given[name] = value
    if len(given) > 1:
        raise InvalidRequest("Give either $deltatoken or $skiptoken.", target="$skiptoken")
    name = next(iter(given), None)
    return name, None if name is None else given[name]


def _page_size(request: Request) -> tuple[int, bool]:
    s = services(request).settings
    m = PREFER_PAGE.search(request.headers.get("prefer", ""))
    if m is None:
        return s.default_page_size, False
    return max(1, min(int(m.group(1)), s.max_page_size)), True


async def changes(request: Request) -> Response:
    app = await app_caller(request)
    s = services(request)
    name, value = _token(request)
    size, preferred = _page_size(request)
    # The first read starts the app's feed: its changes are recorded from then on.
    await s.changefeed.enable_feed(app.host_name, s.feed.clock())
    pruned, head = await s.changefeed.feed_bounds()
    if name == "$deltatoken" and value == LATEST:
        page = FeedPage([], head, False)
    else:
        after = pruned if name is None or value is None else appfeed.seq_of(value, name)
        if after < pruned:
            raise Gone(
                "The token is older than the retained change history: changes after it were"
                f" pruned. Start again with GET /{version(request)}{PATH} without a token"
                " (and resync each user's notifications with delta)."
            )
        if await s.changefeed.feed_lost(after):
            raise Gone(
                "The token was issued before the database failed over and lost changes. Start"
                f" again with GET /{version(request)}{PATH} without a token (and resync each"
                " user's notifications with delta)."
            )
        if after > head:
            raise InvalidRequest(
                f"{name} is ahead of the feed: not one this server issued.", target=name
            )
        page = await s.changefeed.app_changes(app.host_name, after, size)
    base = f"{s.settings.base_url}/{version(request)}{PATH}"
    body: dict[str, Any] = {
        "@odata.context": f"{s.settings.base_url}/{version(request)}/$metadata#notificationChanges",
        "value": [msgspec.to_builtins(appfeed.event(seq, c)) for seq, c in page.entries],
    }
    link = "@odata.nextLink" if page.more else "@odata.deltaLink"
    option = "$skiptoken" if page.more else "$deltatoken"
    body[link] = f"{base}?{option}={appfeed.token(page.cursor)}"
    headers = {"Preference-Applied": f"odata.maxpagesize={size}"} if preferred else None
    return json_response(wire.encode(body), headers=headers)


def routes() -> list[BaseRoute]:
    return [Route(PATH, changes, methods=["GET"])]
