"""Table of malformed and unauthorised requests: each gets the right status and Graph error,
and the store is unchanged afterwards (no change-log position moved for anyone involved)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from herald.store import open_store
from tests.conftest import RegisteredApp, Server


@dataclass
class World:
    server: Server
    app: RegisteredApp
    other_app: RegisteredApp
    user: str
    other_user: str
    tokens: dict[str, str] = field(default_factory=dict)
    mine: str = ""  # a notification of (user, app)
    theirs: str = ""  # a notification of (other_user, app)
    other_apps: str = ""  # a notification of (user, other_app)


@pytest.fixture(scope="module")
def world(server: Server) -> World:
    w = World(
        server, server.register(), server.register(), f"u-{uuid.uuid4()}", f"v-{uuid.uuid4()}"
    )
    w.tokens = {
        "user": server.token(w.app, w.user),
        "other_user": server.token(w.app, w.other_user),
        "other_app": server.token(w.other_app, w.user),
        "app_only": server.token(w.app, None),
        "expired": server.expired_token(w.app, w.user),
        "no_scope": server.token(w.app, w.user, scopes=()),
        "unregistered": server.token(
            RegisteredApp(str(uuid.uuid4()), "", "ghost.example.com"), w.user
        ),
        # An unsigned token whose header has a list for "alg".
        "alg_list": ".".join(
            base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
            for part in ({"alg": ["RS256"]}, {"iss": "x"}, "sig")
        ),
    }

    def create(token: str, host: str) -> str:
        with server.client(w.tokens[token]) as c:
            r = c.post("/beta/me/notifications", json=valid(host))
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

    w.mine = create("user", w.app.host_name)
    w.theirs = create("other_user", w.app.host_name)
    w.other_apps = create("other_app", w.other_app.host_name)
    return w


def valid(host: str, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "targetHostName": host,
        "payload": {"visualContent": {"title": "t", "body": "b"}},
    }
    data.update(overrides)
    return data


def later(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


@dataclass
class Case:
    name: str
    method: str = "POST"
    path: str = "/beta/me/notifications"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = "user"
    status: int = 400
    code: str = "invalidRequest"
    target: str | None = None


def body(**overrides: Any) -> Any:
    """A valid body for the world's app with some fields replaced (HOST is filled in later)."""
    return valid("HOST", **overrides)


CASES = [
    Case("malformed json", content=b'{"payload": '),
    Case("array body", json=[body()], target="body"),
    Case("wrapped body", json={"notification": body()}, target="notification"),
    Case("empty body", content=b""),
    Case("json null", content=b"null"),
    Case(
        "text/plain",
        content=b"{}",
        headers={"Content-Type": "text/plain"},
        status=415,
        code="unsupportedMediaType",
    ),
    Case(
        "no content type",
        content=b"{}",
        headers={"Content-Type": ""},
        status=415,
        code="unsupportedMediaType",
    ),
    Case(
        "brotli encoding",
        json=body(),
        headers={"Content-Encoding": "br"},
        status=415,
        code="unsupportedMediaType",
    ),
    Case("bad gzip", content=b"not gzip", headers={"Content-Encoding": "gzip"}),
    Case("oversized body", json=body(pad="x" * 70_000), status=413, code="requestEntityTooLarge"),
    Case(
        "oversized payload",
        json=body(payload={"rawContent": "x" * 5000}),
        status=413,
        code="requestEntityTooLarge",
    ),
    Case("missing payload", json={"targetHostName": "HOST"}, target="payload"),
    Case("empty payload", json=body(payload={}), target="payload"),
    Case(
        "visual without title",
        json=body(payload={"visualContent": {"body": "b"}}),
        target="payload.visualContent.title",
    ),
    Case("title not a string", json=body(payload={"visualContent": {"title": 5}})),
    Case("rawContent object", json=body(payload={"rawContent": {"a": 1}})),
    Case("unknown payload field", json=body(payload={"rawContent": "x", "html": "<b>"})),
    Case("priority unknown", json=body(priority="Urgent"), target="priority"),
    Case("priority ordinal 7", json=body(priority=7), target="priority"),
    Case("priority boolean", json=body(priority=True), target="priority"),
    Case("platform unknown", json=body(targetPolicy={"platformTypes": ["xbox"]})),
    Case("platform list empty", json=body(targetPolicy={"platformTypes": []})),
    Case("platform number", json=body(targetPolicy={"platformTypes": [1]})),
    Case("ttl not numeric", json=body(displayTimeToLive="abc"), target="displayTimeToLive"),
    Case("ttl negative", json=body(displayTimeToLive=-1), target="displayTimeToLive"),
    Case("ttl fractional", json=body(displayTimeToLive=1.5), target="displayTimeToLive"),
    Case(
        "expiry in the past", json=body(expirationDateTime=later(-1)), target="expirationDateTime"
    ),
    Case(
        "expiry beyond 30 days",
        json=body(expirationDateTime=later(31)),
        target="expirationDateTime",
    ),
    Case("expiry not a date", json=body(expirationDateTime="tomorrow")),
    Case("expiry a number", json=body(expirationDateTime=12345)),
    # The notification type is open: an unknown property is kept (tests/test_conformance.py),
    # unless it is a declared one in the wrong case (a typo) or not an OData identifier.
    Case("declared field in another case", json=body(ReadState="read"), target="ReadState"),
    Case("open property name not an identifier", json=body(**{"foo-bar": 1}), target="foo-bar"),
    Case(
        "open properties too big",
        json=body(big="x" * 5000),
        status=413,
        code="requestEntityTooLarge",
    ),
    Case("server id set", json=body(id="x"), target="id"),
    Case("readState on create", json=body(readState="read"), target="readState"),
    Case("appNotificationId too long", json=body(appNotificationId="x" * 300)),
    Case("appNotificationId number", json=body(appNotificationId=5)),
    Case("groupName object", json=body(groupName={"a": 1})),
    Case(
        "NUL in appNotificationId",
        json=body(appNotificationId="a\u0000b"),
        target="appNotificationId",
    ),
    Case(
        "NUL in user path",
        path="/beta/users/a%00b/notifications",
        json=body(),
        token="app_only",
        target="user",
    ),
    Case(
        "alg not a string",
        json=body(),
        token="alg_list",
        status=401,
        code="InvalidAuthenticationToken",
    ),
    Case(
        "ttl with two minus signs", json=body(displayTimeToLive="--5"), target="displayTimeToLive"
    ),
    Case("ttl unicode digit", json=body(displayTimeToLive="\u00b2"), target="displayTimeToLive"),
    Case("ttl 5000 digits", json=body(displayTimeToLive="9" * 5000), target="displayTimeToLive"),
    Case(
        "expiry overflows",
        json=body(expirationDateTime="9999-12-31T23:59:59-14:00"),
        target="expirationDateTime",
    ),
    Case(
        "deeply nested body",
        content=b'{"payload":{"rawContent":' + b"[" * 20000 + b"]" * 20000 + b"}}",
        target="body",
    ),
    Case("too many platforms", json=body(targetPolicy={"platformTypes": ["ios"] * 10})),
    Case(
        "If-Match not a version",
        method="PATCH",
        path="/beta/me/notifications/MINE",
        json={"readState": "read"},
        headers={"If-Match": 'W/"x1"'},
        status=412,
        code="preconditionFailed",
    ),
    Case(
        "If-Match list without the current tag",
        method="PATCH",
        path="/beta/me/notifications/MINE",
        json={"readState": "read"},
        headers={"If-Match": 'W/"7", W/"8"'},
        status=412,
        code="preconditionFailed",
    ),
    Case(
        "batch header with a control character",
        path="/beta/$batch",
        json={
            "requests": [
                {
                    "id": "1",
                    "method": "GET",
                    "url": "/me/notifications",
                    "headers": {"x-a": "b\u0001"},
                }
            ]
        },
        target="headers",
    ),
    Case(
        "deleteGroup NUL name",
        path="/beta/me/notifications/deleteGroup",
        json={"groupName": "g\u0000"},
        target="groupName",
    ),
    Case(
        "$count with $FILTER twice",
        method="GET",
        path="/beta/me/notifications/$count?$FILTER=x&$filter=y",
        target="$filter",
    ),
    Case(
        "NUL in notification id",
        method="GET",
        path="/beta/me/notifications/a%00b",
        status=404,
        code="itemNotFound",
    ),
    Case(
        "fallback delay too short",
        json=body(
            targetPolicy={"platformTypes": ["iOS"]},
            fallbackPolicy={
                "endpointFallback": {
                    "platformTypes": ["iOS"],
                    "fallbackDelayInSeconds": 30,
                    "visualContent": {"title": "t"},
                }
            },
        ),
    ),
    Case(
        "fallback not iOS",
        json=body(
            targetPolicy={"platformTypes": ["iOS", "android"]},
            fallbackPolicy={
                "endpointFallback": {
                    "platformTypes": ["android"],
                    "fallbackDelayInSeconds": 60,
                    "visualContent": {"title": "t"},
                }
            },
        ),
    ),
    Case(
        "fallback without iOS target",
        json=body(
            targetPolicy={"platformTypes": ["windows"]},
            fallbackPolicy={
                "endpointFallback": {
                    "platformTypes": ["iOS"],
                    "fallbackDelayInSeconds": 60,
                    "visualContent": {"title": "t"},
                }
            },
        ),
    ),
    Case(
        "If-Modified-Since header",
        json=body(),
        headers={"If-Modified-Since": "Sat, 1 Jan 2000 00:00:00 GMT"},
    ),
    Case(
        "other app's host name",
        json=valid("someone-else.example.com"),
        status=403,
        code="accessDenied",
    ),
    Case("no token", json=body(), token=None, status=401, code="InvalidAuthenticationToken"),
    Case(
        "garbage token", json=body(), token="garbage", status=401, code="InvalidAuthenticationToken"
    ),
    Case("basic scheme", json=body(), token="basic", status=401, code="InvalidAuthenticationToken"),
    Case(
        "expired token", json=body(), token="expired", status=401, code="InvalidAuthenticationToken"
    ),
    Case("token without scope", json=body(), token="no_scope", status=403, code="accessDenied"),
    Case("unregistered app", json=body(), token="unregistered", status=403, code="accessDenied"),
    Case(
        "delegated token on another user",
        path="/beta/users/OTHER/notifications",
        json=body(),
        status=403,
        code="accessDenied",
    ),
    Case("app-only token on /me", json=body(), token="app_only", target="X-UNS-ID"),
    Case(
        "patch another user's notification",
        method="PATCH",
        path="/beta/me/notifications/THEIRS",
        json={"readState": "read"},
        status=404,
        code="itemNotFound",
    ),
    Case(
        "patch another app's notification",
        method="PATCH",
        path="/beta/me/notifications/OTHERAPPS",
        json={"readState": "read"},
        status=404,
        code="itemNotFound",
    ),
    Case(
        "get another app's notification",
        method="GET",
        path="/beta/me/notifications/OTHERAPPS",
        status=404,
        code="itemNotFound",
    ),
    Case(
        "delete another user's notification",
        method="DELETE",
        path="/beta/me/notifications/THEIRS",
        status=404,
        code="itemNotFound",
    ),
    Case(
        "delete another app's via users path",
        method="DELETE",
        path="/beta/users/USER/notifications/OTHERAPPS",
        status=404,
        code="itemNotFound",
    ),
    Case(
        "patch bad readState",
        method="PATCH",
        path="/beta/me/notifications/MINE",
        json={"readState": "maybe"},
        target="readState",
    ),
    Case(
        "patch read-only id",
        method="PATCH",
        path="/beta/me/notifications/MINE",
        json={"id": "x"},
        target="id",
    ),
    Case("patch empty", method="PATCH", path="/beta/me/notifications/MINE", json={}),
    Case(
        "patch stale If-Match",
        method="PATCH",
        path="/beta/me/notifications/MINE",
        json={"readState": "read"},
        headers={"If-Match": 'W/"999"'},
        status=412,
        code="preconditionFailed",
    ),
    Case(
        "PUT not allowed",
        method="PUT",
        path="/beta/me/notifications/MINE",
        json=body(),
        status=405,
        code="methodNotAllowed",
    ),
    Case(
        "bad $filter",
        method="GET",
        path="/beta/me/notifications?$filter=readState eq",
        target="$filter",
    ),
    Case(
        "$expand unsupported",
        method="GET",
        path="/beta/me/notifications?$expand=x",
        target="$expand",
    ),
    Case("$top too large", method="GET", path="/beta/me/notifications?$top=5000", target="$top"),
    Case("$count with $top", method="GET", path="/beta/me/notifications/$count?$top=1"),
    Case("unknown route", method="GET", path="/beta/me/notes", status=404, code="itemNotFound"),
    # POST /me/activities (the seed page's example) is an alias of create; nothing else is.
    Case(
        "seed's /me/activities read",
        method="GET",
        path="/beta/me/activities",
        status=404,
        code="itemNotFound",
    ),
    Case(
        "batch of 21",
        path="/beta/$batch",
        json={
            "requests": [
                {"id": str(i), "method": "GET", "url": "/me/notifications"} for i in range(21)
            ]
        },
        target="requests",
    ),
    Case(
        "nested batch",
        path="/beta/$batch",
        json={"requests": [{"id": "1", "method": "POST", "url": "/$batch"}]},
    ),
    Case(
        "deleteGroup without name",
        path="/beta/me/notifications/deleteGroup",
        json={},
        target="groupName",
    ),
]


def substitute(value: Any, w: World) -> Any:
    if isinstance(value, str):
        for key, real in {
            "HOST": w.app.host_name,
            "THEIRS": w.theirs,
            "OTHERAPPS": w.other_apps,
            "MINE": w.mine,
            "OTHER": w.other_user,
            "USER": w.user,
        }.items():
            if value == key or f"/{key}" in value:
                value = value.replace(key, real)
        return value
    if isinstance(value, list):
        return [substitute(v, w) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, w) for k, v in value.items()}
    return value


def horizons(w: World) -> tuple[tuple[int, int], ...]:
    async def read() -> tuple[tuple[int, int], ...]:
        store = open_store(w.server.settings.resolved_store_url)
        await store.open()
        try:
            return tuple([await store.horizon(u) for u in (w.user, w.other_user)])
        finally:
            await store.close()

    return asyncio.run(read())


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request(case: Case, world: World) -> None:
    headers = dict(case.headers)
    if case.token == "basic":
        headers["Authorization"] = "Basic dXNlcjpwYXNz"
    elif case.token == "garbage":
        headers["Authorization"] = "Bearer not.a.jwt"
    elif case.token is not None:
        headers["Authorization"] = f"Bearer {world.tokens[case.token]}"
    kwargs: dict[str, Any] = {"headers": headers}
    if case.content is not None:
        kwargs["content"] = case.content
        headers.setdefault("Content-Type", "application/json")
        if headers["Content-Type"] == "":
            del headers["Content-Type"]
    elif case.json is not None:
        kwargs["json"] = substitute(case.json, world)
    before = horizons(world)
    with httpx.Client(base_url=world.server.base_url, timeout=10) as client:
        response = client.request(case.method, substitute(case.path, world), **kwargs)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert error["code"] == case.code
    assert error["message"]
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    assert error["innerError"]["date"]
    if case.target is not None:
        assert error.get("target") == case.target, error
    assert horizons(world) == before
