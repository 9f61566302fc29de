"""Devices end to end (docs/devices.md): subscriptions, X-UNS-ID, live streams over WebSocket and
Server-Sent Events, resume, delta and cross-device state, against a real Herald on SQLite and on
PostgreSQL, with real HTTP, SSE and WebSocket clients.

The module runs its own server (same stores as the session `server` fixture) with a short
`sweep_interval` and `keepalive_interval`, so that expiry and keep-alives can be observed within
the few seconds a test may wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.conftest import RegisteredApp, Server, servers
from tests.devices import (
    WAIT,
    Refused,
    SseStream,
    Stream,
    api,
    apns_channel,
    assert_graph_error,
    b64url,
    in_seconds,
    notification_body,
    open_stream,
    p256dh,
    subscription_body,
    webpush_channel,
    without_context,
)

SWEEP = 0.5
KEEPALIVE = 2.0
SUBS = "/beta/me/notificationSubscriptions"
FEED = "/beta/me/notifications"
DELTA = "/beta/me/notifications/delta"
SUB_KEYS = {
    "deliveryState",
    "id",
    "application",
    "platform",
    "displayName",
    "pushChannel",
    "expirationDateTime",
    "createdDateTime",
    "lastModifiedDateTime",
}
REMOVED = {"reason": "deleted"}
PROTOCOLS = ["ws", "sse"]


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Herald on SQLite, and again on PostgreSQL, sweeping expiry every 0.5 s and sending
    keep-alives every 2 s (the session fixture's 30 s / 25 s are too slow to observe)."""
    data = tmp_path_factory.mktemp("herald-devices")
    yield from servers(request.param, data, sweep_interval=SWEEP, keepalive_interval=KEEPALIVE)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def forgetful(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A Herald that keeps one second of change history (change_retention = 1 s)."""
    data = tmp_path_factory.mktemp("herald-forgetful")
    yield from servers(request.param, data, sweep_interval=0.3, change_retention=1)


@pytest.fixture
def other_app(server: Server) -> RegisteredApp:
    return server.register()


@pytest.fixture
def forgetful_app(forgetful: Server) -> Iterator[RegisteredApp]:
    # Registered here, not in the (async) test: the CLI runs its own event loop.
    yield forgetful.register()
    forgetful.close_clients()


def new_user() -> str:
    return f"dev-{uuid.uuid4()}"


def parse(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, value
    return moment


def token_expiring_at(server: Server, app: RegisteredApp, user: str, exp: int) -> str:
    """A correctly signed delegated token with this `exp` (may lie in the past)."""
    from joserfc import jwt

    from herald.auth.issuer import LocalIssuer

    issuer = LocalIssuer.load_or_create(server.data, server.settings.issuer_url, "api://herald")
    claims = {
        "iss": issuer.issuer,
        "aud": issuer.audience,
        "iat": exp - 300,
        "nbf": exp - 300,
        "exp": exp,
        "azp": app.client_id,
        "appid": app.client_id,
        "scp": "Notifications.ReadWrite.CreatedByApp",
        "oid": user,
        "sub": user,
    }
    header = {"alg": "RS256", "typ": "JWT", "kid": issuer.kid}
    return jwt.encode(header, claims, issuer.key, algorithms=["RS256"])


def create_sub(c: httpx.Client, host: str, platform: str = "live", **fields: Any) -> dict[str, Any]:
    r = c.post(SUBS, json=subscription_body(host, platform, **fields))
    assert r.status_code == 201, r.text
    return dict(r.json())


def sub_list(c: httpx.Client) -> list[dict[str, Any]]:
    r = c.get(SUBS)
    assert r.status_code == 200, r.text
    return [without_context(s) for s in r.json()["value"]]


async def subscribe(a: httpx.AsyncClient, host: str, platform: str = "live", **fields: Any) -> str:
    r = await a.post(SUBS, json=subscription_body(host, platform, **fields))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def post(
    a: httpx.AsyncClient,
    host: str,
    path: str = FEED,
    headers: dict[str, str] | None = None,
    **f: Any,
) -> dict[str, Any]:
    r = await a.post(path, json=notification_body(host, **f), headers=headers or {})
    assert r.status_code == 201, r.text
    return dict(r.json())


def change(kind: str, position: int, n: dict[str, Any]) -> dict[str, Any]:
    """The exact stream message for a created/updated change of notification `n`."""
    return {"type": kind, "position": position, "id": n["id"], "notification": without_context(n)}


def removal(kind: str, position: int, id: str) -> dict[str, Any]:
    return {"type": kind, "position": position, "id": id, "@removed": REMOVED}


async def next_change(stream: Stream, wait: float = WAIT) -> dict[str, Any]:
    message = await stream.next(wait)
    if "notification" in message:
        message["notification"] = without_context(message["notification"])
    return message


def delta_token(link: str) -> str:
    url = httpx.URL(link)
    assert url.path.endswith("/beta/me/notifications/delta") or url.path.endswith(
        "/notifications/delta"
    ), link
    token = url.params.get("$deltatoken")
    assert token is not None, link
    return token


def delta_sync(
    c: httpx.Client, url: str, page_size: int | None = None
) -> tuple[list[list[dict[str, Any]]], str]:
    """Follow nextLinks to the deltaLink; return the pages and the deltaLink."""
    headers = {"Prefer": f"odata.maxpagesize={page_size}"} if page_size else {}
    pages = []
    for _ in range(100):
        r = c.get(url, headers=headers)
        assert r.status_code == 200, r.text
        if page_size:
            assert r.headers.get("preference-applied") == f"odata.maxpagesize={page_size}"
        page = r.json()
        pages.append(page["value"])
        if "@odata.deltaLink" in page:
            assert "@odata.nextLink" not in page, page
            return pages, page["@odata.deltaLink"]
        url = page["@odata.nextLink"]
        assert "$skiptoken=" in httpx.URL(url).query.decode().replace("%24", "$"), url
    raise AssertionError("no deltaLink after 100 pages")


# =============================================================================================
# Subscriptions


def test_create_answers_201_with_location_and_the_resource(
    server: Server, app: RegisteredApp
) -> None:
    c = server.client(server.token(app, new_user()))
    channel = webpush_channel()
    r = c.post(
        SUBS,
        json={
            "application": app.host_name.upper(),
            "platform": "WEBPUSH",
            "displayName": "Firefox on the laptop",
            "pushChannel": channel,
        },
    )
    assert r.status_code == 201, r.text
    s = r.json()
    assert {k for k in s if not k.startswith("@odata.")} == SUB_KEYS
    uuid.UUID(s["id"])
    assert s["application"] == app.host_name
    assert s["platform"] == "webPush"
    assert s["displayName"] == "Firefox on the laptop"
    assert s["pushChannel"] == channel
    created = parse(s["createdDateTime"])
    assert abs(created - datetime.now(UTC)) < timedelta(seconds=30)
    assert parse(s["lastModifiedDateTime"]) >= created
    lifetime = parse(s["expirationDateTime"]) - created
    assert timedelta(days=30) - timedelta(seconds=5) <= lifetime <= timedelta(days=30, seconds=5)
    location = urljoin(server.base_url + "/", r.headers["location"])
    assert location == f"{server.base_url}/beta/me/notificationSubscriptions/{s['id']}"
    got = c.get(location)
    assert got.status_code == 200 and without_context(got.json()) == without_context(s)
    assert sub_list(c) == [without_context(s)]
    assert c.get(f"/v1.0/me/notificationSubscriptions/{s['id']}").json()["id"] == s["id"]


def test_live_subscription_has_no_push_channel(server: Server, app: RegisteredApp) -> None:
    c = server.client(server.token(app, new_user()))
    s = create_sub(c, app.host_name, "LIVE")
    assert s["platform"] == "live" and s.get("pushChannel") is None
    assert s.get("displayName") is None
    # Push platforms may omit the channel and use only the live stream.
    for platform in ("iOS", "android", "windows", "webPush"):
        t = create_sub(c, app.host_name, platform, pushChannel=None)
        assert t["platform"] == platform and t.get("pushChannel") is None
    assert [x["platform"] for x in sub_list(c)] == ["live", "iOS", "android", "windows", "webPush"]


def test_valid_edges_are_accepted(server: Server, app: RegisteredApp) -> None:
    c = server.client(server.token(app, new_user()))
    create_sub(c, app.host_name, "ios", pushChannel={"deviceToken": "aB" * 32})
    create_sub(c, app.host_name, "iOS", pushChannel={"deviceToken": "f" * 200})
    create_sub(c, app.host_name, "live", displayName="x" * 256)
    far = datetime.now(UTC) + timedelta(days=89)
    s = create_sub(c, app.host_name, "live", expirationDateTime=far.isoformat())
    assert abs(parse(s["expirationDateTime"]) - far) < timedelta(seconds=1)
    assert [x["platform"] for x in sub_list(c)] == ["iOS", "iOS", "live", "live"]


@pytest.mark.parametrize("platform", ["webPush", "iOS", "android", "windows"])
def test_same_push_channel_again_updates_the_same_subscription(
    server: Server, app: RegisteredApp, platform: str
) -> None:
    c = server.client(server.token(app, new_user()))
    first = create_sub(c, app.host_name, platform, displayName="one")
    channel = dict(first["pushChannel"])
    if platform == "webPush":  # same endpoint, fresh keys (the browser re-subscribed)
        channel["keys"] = {"p256dh": p256dh(), "auth": b64url(uuid.uuid4().bytes)}
    body = subscription_body(app.host_name, platform, displayName="two", pushChannel=channel)
    again = c.post(SUBS, json=body)
    assert again.status_code == 200, again.text
    s = again.json()
    assert s["id"] == first["id"]
    assert s["displayName"] == "two" and s["pushChannel"] == channel
    assert s["createdDateTime"] == first["createdDateTime"]
    assert [x["id"] for x in sub_list(c)] == [first["id"]]


def test_push_channel_registered_by_another_user_removes_the_first_users(
    server: Server, app: RegisteredApp
) -> None:
    alice = server.client(server.token(app, new_user()))
    bob = server.client(server.token(app, new_user()))
    s = create_sub(alice, app.host_name, "webPush")
    keep = create_sub(alice, app.host_name, "live")
    r = bob.post(
        SUBS, json=subscription_body(app.host_name, "webPush", pushChannel=s["pushChannel"])
    )
    assert r.status_code == 201, r.text
    assert r.json()["id"] != s["id"]
    assert_graph_error(alice.get(f"{SUBS}/{s['id']}"), 404, "itemNotFound")
    assert [x["id"] for x in sub_list(alice)] == [keep["id"]]
    assert [x["id"] for x in sub_list(bob)] == [r.json()["id"]]


def test_push_channel_belongs_to_one_subscription_per_app(
    server: Server, app: RegisteredApp, other_app: RegisteredApp
) -> None:
    user = new_user()
    mine = server.client(server.token(app, user))
    theirs = server.client(server.token(other_app, user))
    s = create_sub(mine, app.host_name, "webPush")
    # The same endpoint for another app (same user, then another user) is that app's business.
    t = create_sub(theirs, other_app.host_name, "webPush", pushChannel=s["pushChannel"])
    assert t["id"] != s["id"]
    other_user = server.client(server.token(other_app, new_user()))
    create_sub(other_user, other_app.host_name, "webPush", pushChannel=s["pushChannel"])
    assert mine.get(f"{SUBS}/{s['id']}").status_code == 200
    assert [x["id"] for x in sub_list(mine)] == [s["id"]]


def test_list_holds_only_the_calling_apps_subscriptions_of_the_user_oldest_first(
    server: Server, app: RegisteredApp, other_app: RegisteredApp
) -> None:
    user, other = new_user(), new_user()
    mine = server.client(server.token(app, user))
    s1 = create_sub(mine, app.host_name, "webPush")
    s2 = create_sub(mine, app.host_name, "live")
    s3 = create_sub(mine, app.host_name, "iOS")
    s4 = create_sub(server.client(server.token(app, other)), app.host_name, "live")
    s5 = create_sub(server.client(server.token(other_app, user)), other_app.host_name, "live")
    assert sub_list(mine) == [without_context(s) for s in (s1, s2, s3)]
    assert [x["id"] for x in sub_list(server.client(server.token(app, other)))] == [s4["id"]]
    assert [x["id"] for x in sub_list(server.client(server.token(other_app, user)))] == [s5["id"]]


def test_patch_renews_renames_and_rotates(server: Server, app: RegisteredApp) -> None:
    c = server.client(server.token(app, new_user()))
    s = create_sub(c, app.host_name, "webPush", displayName="old")
    url = f"{SUBS}/{s['id']}"
    later = datetime.now(UTC) + timedelta(days=60)
    r = c.patch(url, json={"expirationDateTime": later.isoformat()})
    assert r.status_code == 200, r.text
    renewed = r.json()
    assert abs(parse(renewed["expirationDateTime"]) - later) < timedelta(seconds=1)
    assert parse(renewed["lastModifiedDateTime"]) >= parse(s["lastModifiedDateTime"])
    assert renewed["displayName"] == "old" and renewed["pushChannel"] == s["pushChannel"]

    r = c.patch(url, json={"displayName": "Firefox on the desk"})
    assert r.status_code == 200, r.text
    assert r.json()["displayName"] == "Firefox on the desk"
    assert r.json()["expirationDateTime"] == renewed["expirationDateTime"]

    # null clears: no name, and no push channel (the device goes live-only)...
    r = c.patch(url, json={"displayName": None, "pushChannel": None})
    assert r.status_code == 200, r.text
    assert r.json()["displayName"] is None and r.json()["pushChannel"] is None
    # ...and a channel can be given again.
    r = c.patch(url, json={"displayName": "Firefox on the desk", "pushChannel": s["pushChannel"]})
    assert r.json()["pushChannel"] == s["pushChannel"]

    rotated = webpush_channel()
    r = c.patch(url, json={"pushChannel": rotated})
    assert r.status_code == 200, r.text
    assert r.json()["pushChannel"] == rotated
    got = without_context(c.get(url).json())
    assert got == without_context(r.json())
    assert {k: got[k] for k in ("id", "application", "platform", "createdDateTime")} == {
        k: s[k] for k in ("id", "application", "platform", "createdDateTime")
    }
    # The old endpoint no longer belongs to this subscription: another user may take it freely.
    bob = server.client(server.token(app, new_user()))
    create_sub(bob, app.host_name, "webPush", pushChannel=s["pushChannel"])
    assert c.get(url).status_code == 200
    # ...while taking the new one moves it away from this user.
    create_sub(bob, app.host_name, "webPush", pushChannel=rotated)
    assert_graph_error(c.get(url), 404, "itemNotFound")


@pytest.mark.parametrize(
    ("case", "status", "code", "target"),
    [
        ("application", 400, "invalidRequest", "application"),
        ("platform", 400, "invalidRequest", "platform"),
        ("past expiry", 400, "invalidRequest", "expirationDateTime"),
        ("expiry beyond 90 days", 400, "invalidRequest", "expirationDateTime"),
        ("bad p256dh", 400, "invalidRequest", "pushChannel"),
        ("long displayName", 400, "invalidRequest", "displayName"),
        ("unknown field", 400, "invalidRequest", "foo"),
        ("id", 400, "invalidRequest", "id"),
    ],
)
def test_bad_patch_changes_nothing(
    server: Server, app: RegisteredApp, case: str, status: int, code: str, target: str
) -> None:
    c = server.client(server.token(app, new_user()))
    s = create_sub(c, app.host_name, "webPush")
    channel = webpush_channel()
    channel["keys"]["p256dh"] = b64url(b"\x04" + b"\x01" * 63)
    body: dict[str, Any] = {
        "application": "other.example.com",
        "platform": "iOS",
        "past expiry": {"expirationDateTime": in_seconds(-60)},
        "expiry beyond 90 days": {"expirationDateTime": in_seconds(91 * 86400)},
        "bad p256dh": {"pushChannel": channel},
        "long displayName": {"displayName": "x" * 257},
        "unknown field": {"foo": 1},
        "id": {"id": str(uuid.uuid4())},
    }[case]
    if case in ("application", "platform"):
        body = {case: body}
    before = sub_list(c)
    r = c.patch(f"{SUBS}/{s['id']}", json=body)
    assert_graph_error(r, status, code, target, prefix=True)
    assert sub_list(c) == before


def test_delete_answers_204_then_404(server: Server, app: RegisteredApp) -> None:
    c = server.client(server.token(app, new_user()))
    s = create_sub(c, app.host_name, "webPush")
    keep = create_sub(c, app.host_name, "live")
    r = c.delete(f"{SUBS}/{s['id']}")
    assert r.status_code == 204 and r.content == b""
    assert_graph_error(c.get(f"{SUBS}/{s['id']}"), 404, "itemNotFound")
    assert_graph_error(c.delete(f"{SUBS}/{s['id']}"), 404, "itemNotFound")
    r = c.patch(f"{SUBS}/{s['id']}", json={"displayName": "x"})
    assert_graph_error(r, 404, "itemNotFound")
    assert [x["id"] for x in sub_list(c)] == [keep["id"]]
    # Its push channel is free again: registering it creates a new subscription.
    again = c.post(
        SUBS, json=subscription_body(app.host_name, "webPush", pushChannel=s["pushChannel"])
    )
    assert again.status_code == 201 and again.json()["id"] != s["id"]


def test_other_users_and_apps_subscriptions_are_not_found(
    server: Server, app: RegisteredApp, other_app: RegisteredApp
) -> None:
    user = new_user()
    owner = server.client(server.token(app, user))
    s = create_sub(owner, app.host_name, "webPush", displayName="mine")
    url = f"{SUBS}/{s['id']}"
    strangers = [
        server.client(server.token(app, new_user())),  # another user of the app
        server.client(server.token(other_app, user)),  # the same user through another app
    ]
    for c in strangers:
        assert_graph_error(c.get(url), 404, "itemNotFound")
        assert_graph_error(c.patch(url, json={"displayName": "stolen"}), 404, "itemNotFound")
        assert_graph_error(c.delete(url), 404, "itemNotFound")
        assert sub_list(c) == []
    got = owner.get(url)
    assert got.status_code == 200 and without_context(got.json()) == without_context(s)


def test_app_only_tokens_cannot_manage_subscriptions(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    owner = server.client(server.token(app, user))
    s = create_sub(owner, app.host_name, "live")
    c = server.client(server.token(app, None))
    assert_graph_error(c.post(SUBS, json=subscription_body(app.host_name)), 400, "invalidRequest")
    assert_graph_error(c.get(SUBS), 400, "invalidRequest")
    assert_graph_error(c.get(f"{SUBS}/{s['id']}"), 400, "invalidRequest")
    assert_graph_error(c.delete(f"{SUBS}/{s['id']}"), 400, "invalidRequest")
    r = c.post(
        f"/beta/users/{user}/notificationSubscriptions", json=subscription_body(app.host_name)
    )
    assert_graph_error(r, 404, "itemNotFound")
    assert [x["id"] for x in sub_list(owner)] == [s["id"]]


def _bad_subscription(case: str, host: str) -> dict[str, Any]:
    web = webpush_channel()
    bodies: dict[str, dict[str, Any]] = {
        "unknown platform": subscription_body(host, "blackberry"),
        "p256dh 64 bytes": subscription_body(
            host,
            "webPush",
            pushChannel={**web, "keys": {**web["keys"], "p256dh": b64url(b"\x04" * 64)}},
        ),
        "p256dh 66 bytes": subscription_body(
            host,
            "webPush",
            pushChannel={**web, "keys": {**web["keys"], "p256dh": b64url(b"\x04" * 66)}},
        ),
        "p256dh not base64url": subscription_body(
            host, "webPush", pushChannel={**web, "keys": {**web["keys"], "p256dh": "!" * 87}}
        ),
        "auth 15 bytes": subscription_body(
            host, "webPush", pushChannel={**web, "keys": {**web["keys"], "auth": b64url(b"a" * 15)}}
        ),
        "auth 17 bytes": subscription_body(
            host, "webPush", pushChannel={**web, "keys": {**web["keys"], "auth": b64url(b"a" * 17)}}
        ),
        "webPush without keys": subscription_body(
            host, "webPush", pushChannel={"endpoint": web["endpoint"]}
        ),
        "webPush http endpoint": subscription_body(
            host,
            "webPush",
            pushChannel={**web, "endpoint": web["endpoint"].replace("https:", "http:")},
        ),
        "webPush endpoint not a URL": subscription_body(
            host, "webPush", pushChannel={**web, "endpoint": "push.example.net"}
        ),
        "webPush with an APNs channel": subscription_body(
            host, "webPush", pushChannel=apns_channel()
        ),
        "APNs token not hex": subscription_body(
            host, "iOS", pushChannel={"deviceToken": "zz" * 32}
        ),
        "APNs token 63 digits": subscription_body(
            host, "iOS", pushChannel={"deviceToken": "a" * 63}
        ),
        "APNs token 201 digits": subscription_body(
            host, "iOS", pushChannel={"deviceToken": "a" * 201}
        ),
        "FCM token empty": subscription_body(
            host, "android", pushChannel={"registrationToken": ""}
        ),
        "WNS http URI": subscription_body(
            host, "windows", pushChannel={"channelUri": "http://wns.example.net/x"}
        ),
        "push channel on live": subscription_body(host, "live", pushChannel=web),
        "webPush endpoint broken IPv6": subscription_body(
            host, "webPush", pushChannel={**web, "endpoint": "https://[::1/c"}
        ),
        "webPush endpoint port out of range": subscription_body(
            host, "webPush", pushChannel={**web, "endpoint": "https://a.example:99999/c"}
        ),
        "WNS URI with a space": subscription_body(
            host, "windows", pushChannel={"channelUri": "https://a b.example/c"}
        ),
        "expiry in the past": subscription_body(host, expirationDateTime=in_seconds(-60)),
        "expiry beyond 90 days": subscription_body(
            host, expirationDateTime=in_seconds(90 * 86400 + 3600)
        ),
        "expiry not a date": subscription_body(host, expirationDateTime="tomorrow"),
        "displayName too long": subscription_body(host, displayName="x" * 257),
        "unknown field": subscription_body(host, foo=1),
        "another app's host": subscription_body("someone-else.example.com", "live"),
    }
    return bodies[case]


BAD_SUBSCRIPTIONS = [
    ("unknown platform", 400, "invalidRequest", "platform"),
    ("p256dh 64 bytes", 400, "invalidRequest", "pushChannel"),
    ("p256dh 66 bytes", 400, "invalidRequest", "pushChannel"),
    ("p256dh not base64url", 400, "invalidRequest", "pushChannel"),
    ("auth 15 bytes", 400, "invalidRequest", "pushChannel"),
    ("auth 17 bytes", 400, "invalidRequest", "pushChannel"),
    ("webPush without keys", 400, "invalidRequest", "pushChannel"),
    ("webPush http endpoint", 400, "invalidRequest", "pushChannel"),
    ("webPush endpoint not a URL", 400, "invalidRequest", "pushChannel"),
    ("webPush with an APNs channel", 400, "invalidRequest", "pushChannel"),
    ("APNs token not hex", 400, "invalidRequest", "pushChannel"),
    ("APNs token 63 digits", 400, "invalidRequest", "pushChannel"),
    ("APNs token 201 digits", 400, "invalidRequest", "pushChannel"),
    ("FCM token empty", 400, "invalidRequest", "pushChannel"),
    ("WNS http URI", 400, "invalidRequest", "pushChannel"),
    ("push channel on live", 400, "invalidRequest", "pushChannel"),
    ("webPush endpoint broken IPv6", 400, "invalidRequest", "pushChannel"),
    ("webPush endpoint port out of range", 400, "invalidRequest", "pushChannel"),
    ("WNS URI with a space", 400, "invalidRequest", "pushChannel"),
    ("expiry in the past", 400, "invalidRequest", "expirationDateTime"),
    ("expiry beyond 90 days", 400, "invalidRequest", "expirationDateTime"),
    ("expiry not a date", 400, "invalidRequest", "expirationDateTime"),
    ("displayName too long", 400, "invalidRequest", "displayName"),
    ("unknown field", 400, "invalidRequest", "foo"),
    ("another app's host", 403, "accessDenied", None),
]


@pytest.mark.parametrize(("case", "status", "code", "target"), BAD_SUBSCRIPTIONS)
def test_bad_subscription_is_refused_and_changes_nothing(
    server: Server, app: RegisteredApp, case: str, status: int, code: str, target: str | None
) -> None:
    c = server.client(server.token(app, new_user()))
    create_sub(c, app.host_name, "webPush")
    before = sub_list(c)
    r = c.post(SUBS, json=_bad_subscription(case, app.host_name))
    assert_graph_error(r, status, code, target, prefix=True)
    assert sub_list(c) == before


def test_quota_of_subscriptions_per_user_and_app(
    server: Server, app: RegisteredApp, other_app: RegisteredApp
) -> None:
    limit = server.settings.max_subscriptions
    assert limit == 50
    user = new_user()
    c = server.client(server.token(app, user))
    subs = [create_sub(c, app.host_name, "live") for _ in range(limit - 1)]
    web = create_sub(c, app.host_name, "webPush")
    before = sub_list(c)
    assert len(before) == limit
    r = c.post(SUBS, json=subscription_body(app.host_name, "webPush"))
    assert_graph_error(r, 403, "quotaLimitReached")
    r = c.post(SUBS, json=subscription_body(app.host_name, "live"))
    assert_graph_error(r, 403, "quotaLimitReached")
    assert sub_list(c) == before
    # Registering a push channel again updates its subscription: no new one, no quota.
    again = c.post(
        SUBS, json=subscription_body(app.host_name, "webPush", pushChannel=web["pushChannel"])
    )
    assert again.status_code == 200 and again.json()["id"] == web["id"], again.text
    assert len(sub_list(c)) == limit
    # Other users and other apps have their own quota.
    create_sub(server.client(server.token(app, new_user())), app.host_name, "live")
    create_sub(server.client(server.token(other_app, user)), other_app.host_name, "live")
    # Deleting one makes room for one.
    assert c.delete(f"{SUBS}/{subs[0]['id']}").status_code == 204
    create_sub(c, app.host_name, "live")
    assert_graph_error(
        c.post(SUBS, json=subscription_body(app.host_name)), 403, "quotaLimitReached"
    )


def test_expired_subscription_is_gone(server: Server, app: RegisteredApp) -> None:
    c = server.client(server.token(app, new_user()))
    s = create_sub(c, app.host_name, "live", expirationDateTime=in_seconds(1.5))
    assert c.get(f"{SUBS}/{s['id']}").status_code == 200
    time.sleep(2.0)
    assert_graph_error(c.get(f"{SUBS}/{s['id']}"), 404, "itemNotFound")
    r = c.patch(f"{SUBS}/{s['id']}", json={"expirationDateTime": in_seconds(86400)})
    assert_graph_error(r, 404, "itemNotFound")
    assert sub_list(c) == []


# =============================================================================================
# X-UNS-ID


def test_app_only_token_posts_to_the_user_of_a_uns_id(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    owner = server.client(server.token(app, user))
    s = create_sub(owner, app.host_name, "webPush")
    c = server.client(server.token(app, None))
    headers = {"X-UNS-ID": s["id"]}
    r = c.post(FEED, json=notification_body(app.host_name), headers=headers)
    assert r.status_code == 201, r.text
    n = r.json()
    assert r.headers["location"] == f"{server.base_url}/beta/users/{user}/notifications/{n['id']}"
    mine = owner.get(FEED).json()["value"]
    assert [x["id"] for x in mine] == [n["id"]]
    # Every /me/notifications operation accepts it.
    listed = c.get(FEED, headers=headers)
    assert listed.status_code == 200 and [x["id"] for x in listed.json()["value"]] == [n["id"]]
    r = c.patch(f"{FEED}/{n['id']}", json={"readState": "read"}, headers=headers)
    assert r.status_code == 200 and r.json()["readState"] == "read"
    assert owner.get(f"{FEED}/{n['id']}").json()["readState"] == "read"
    assert c.delete(f"{FEED}/{n['id']}", headers=headers).status_code == 204
    assert owner.get(FEED).json()["value"] == []


def test_uns_id_errors(server: Server, app: RegisteredApp, other_app: RegisteredApp) -> None:
    user = new_user()
    owner = server.client(server.token(app, user))
    c = server.client(server.token(app, None))
    body = notification_body(app.host_name)
    # Unknown.
    r = c.post(FEED, json=body, headers={"X-UNS-ID": str(uuid.uuid4())})
    assert_graph_error(r, 404, "itemNotFound", "X-UNS-ID")
    # Another app's subscription of the same user.
    foreign = create_sub(server.client(server.token(other_app, user)), other_app.host_name, "live")
    r = c.post(FEED, json=body, headers={"X-UNS-ID": foreign["id"]})
    assert_graph_error(r, 403, "accessDenied")
    # Deleted.
    gone = create_sub(owner, app.host_name, "live")
    assert owner.delete(f"{SUBS}/{gone['id']}").status_code == 204
    r = c.post(FEED, json=body, headers={"X-UNS-ID": gone["id"]})
    assert_graph_error(r, 404, "itemNotFound", "X-UNS-ID")
    # Expired.
    short = create_sub(owner, app.host_name, "live", expirationDateTime=in_seconds(1.5))
    r = c.post(FEED, json=notification_body(app.host_name), headers={"X-UNS-ID": short["id"]})
    assert r.status_code == 201, r.text
    time.sleep(2.0)
    r = c.post(FEED, json=body, headers={"X-UNS-ID": short["id"]})
    assert_graph_error(r, 404, "itemNotFound", "X-UNS-ID")
    # No X-UNS-ID: an app-only token has no "me".
    assert_graph_error(c.post(FEED, json=body), 400, "invalidRequest", "X-UNS-ID")
    # A delegated token naming another user's subscription.
    other = create_sub(server.client(server.token(app, new_user())), app.host_name, "live")
    r = owner.post(FEED, json=body, headers={"X-UNS-ID": other["id"]})
    assert r.status_code in (400, 403, 404), r.text
    assert_graph_error(r, r.status_code, r.json()["error"]["code"])
    # Only the one post through the (then unexpired) subscription landed.
    assert len(owner.get(FEED).json()["value"]) == 1


# =============================================================================================
# Live delivery


async def test_live_delivery_and_cross_device_state(server: Server, app: RegisteredApp) -> None:
    """A has a WebSocket device and an SSE device, B one device; the app server posts to A."""
    alice, bob = new_user(), new_user()
    ta, tb = server.token(app, alice), server.token(app, bob)
    host, base = app.host_name, server.base_url
    async with api(base, ta) as a, api(base, tb) as b, api(base, server.token(app, None)) as srv:
        d1 = await subscribe(a, host, "webPush")
        d2 = await subscribe(a, host, "live")
        db = await subscribe(b, host, "live")
        async with (
            open_stream("ws", base, d1, ta) as s1,
            open_stream("sse", base, d2, ta) as s2,
            open_stream("ws", base, db, tb) as sb,
        ):
            assert [await s1.ready(), await s2.ready(), await sb.ready()] == [0, 0, 0]

            n = await post(srv, host, f"/beta/users/{alice}/notifications")
            got = without_context((await a.get(f"{FEED}/{n['id']}")).json())
            assert without_context(n) == got
            assert await next_change(s1) == change("created", 1, n)
            assert await next_change(s2) == change("created", 1, n)

            r = await a.patch(
                f"{FEED}/{n['id']}", json={"readState": "read"}, headers={"X-UNS-ID": d1}
            )
            assert r.status_code == 200, r.text
            read = r.json()
            assert read["readState"] == "read"
            assert await next_change(s2) == change("updated", 2, read)

            r = await a.delete(f"{FEED}/{n['id']}", headers={"X-UNS-ID": d2})
            assert r.status_code == 204, r.text
            # Device 1's next message is the deletion: it was not sent its own update.
            assert await next_change(s1) == removal("deleted", 3, n["id"])

            soon = await post(
                srv, host, f"/beta/users/{alice}/notifications", expirationDateTime=in_seconds(3)
            )
            # Device 2's next message is this one: it was not sent its own deletion.
            assert await next_change(s1) == change("created", 4, soon)
            assert await next_change(s2) == change("created", 4, soon)
            assert await next_change(s1) == removal("expired", 5, soon["id"])
            assert await next_change(s2) == removal("expired", 5, soon["id"])

            # B received nothing of A's: its first message is its own first change.
            nb = await post(srv, host, f"/beta/users/{bob}/notifications")
            assert await next_change(sb) == change("created", 1, nb)
            assert [m["type"] for m in sb.messages] == ["ready", "created"]
            # Device 1 never saw its own update, device 2 never saw its own deletion.
            types1 = [m["type"] for m in s1.messages]
            types2 = [m["type"] for m in s2.messages]
            assert types1 == ["ready", "created", "deleted", "created", "expired"]
            assert types2 == ["ready", "created", "updated", "created", "expired"]


async def test_delete_group_and_replace_reach_the_other_devices(
    server: Server, app: RegisteredApp
) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        d1, d2 = await subscribe(a, host, "iOS"), await subscribe(a, host, "android")
        async with (
            open_stream("sse", base, d1, token) as s1,
            open_stream("ws", base, d2, token) as s2,
        ):
            assert await s1.ready() == await s2.ready() == 0
            g1, g2 = await post(a, host, groupName="g"), await post(a, host, groupName="g")
            for s in (s1, s2):
                assert await next_change(s) == change("created", 1, g1)
                assert await next_change(s) == change("created", 2, g2)
            # deleteGroup from device 1 reaches device 2 as two deletions, device 1 not at all.
            r = await a.post(
                f"{FEED}/deleteGroup", json={"groupName": "g"}, headers={"X-UNS-ID": d1}
            )
            assert r.status_code == 200 and r.json() == {"deletedCount": 2}, r.text
            deleted = [await next_change(s2), await next_change(s2)]
            assert [m["position"] for m in deleted] == [3, 4]
            assert {m["id"] for m in deleted} == {g1["id"], g2["id"]}
            assert all(m == removal("deleted", m["position"], m["id"]) for m in deleted)
            # Replacing by appNotificationId fans out as an update.
            third = await post(a, host)
            for s in (s1, s2):
                assert await next_change(s) == change("created", 5, third)
            body = notification_body(host, appNotificationId=third["appNotificationId"])
            body["payload"] = {"rawContent": "v2"}
            r = await a.post(FEED, json=body)
            assert r.status_code == 200, r.text
            for s in (s1, s2):
                assert await next_change(s) == change("updated", 6, r.json())
            assert [m["position"] for m in s1.messages] == [0, 1, 2, 5, 6]


async def test_a_devices_own_post_is_not_sent_back_but_an_app_servers_is(
    server: Server, app: RegisteredApp
) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a, api(base, server.token(app, None)) as srv:
        d1, d2 = await subscribe(a, host, "iOS"), await subscribe(a, host, "android")
        async with (
            open_stream("sse", base, d1, token) as s1,
            open_stream("ws", base, d2, token) as s2,
        ):
            assert await s1.ready() == await s2.ready() == 0
            # The app server posts through device 1's UNS ID: that names the user, not the
            # author, so device 1 gets it too.
            pushed = await post(srv, host, headers={"X-UNS-ID": d1})
            for s in (s1, s2):
                assert await next_change(s) == change("created", 1, pushed)
            # Device 1 posts with its own delegated token and names itself: only device 2 gets it.
            mine = await post(a, host, headers={"X-UNS-ID": d1})
            assert await next_change(s2) == change("created", 2, mine)
            other = await post(a, host)
            assert await next_change(s1) == change("created", 3, other)
            assert await next_change(s2) == change("created", 3, other)


async def test_platform_filtering(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        ios, live = await subscribe(a, host, "iOS"), await subscribe(a, host, "live")
        web, android = await subscribe(a, host, "webPush"), await subscribe(a, host, "android")
        ios_live_only = await subscribe(a, host, "iOS", pushChannel=None)
        async with (
            open_stream("ws", base, ios, token) as s_ios,
            open_stream("sse", base, live, token) as s_live,
            open_stream("sse", base, web, token) as s_web,
            open_stream("ws", base, android, token) as s_android,
            open_stream("ws", base, ios_live_only, token) as s_ios2,
        ):
            streams = {
                "iOS": s_ios,
                "live": s_live,
                "webPush": s_web,
                "android": s_android,
                "iOS (live only)": s_ios2,
            }
            assert [await s.ready() for s in streams.values()] == [0] * 5

            async def expect(names: list[str], message: dict[str, Any]) -> None:
                for name in names:
                    assert await next_change(streams[name]) == message, name

            ios_ones = ["iOS", "live", "iOS (live only)"]
            only_ios = await post(a, host, targetPolicy={"platformTypes": ["iOS"]})
            await expect(ios_ones, change("created", 1, only_ios))
            everyone = await post(a, host)
            await expect(list(streams), change("created", 2, everyone))
            # An update of the iOS-only notification stays off the other platforms too.
            r = await a.patch(f"{FEED}/{only_ios['id']}", json={"readState": "read"})
            assert r.status_code == 200
            await expect(ios_ones, change("updated", 3, r.json()))
            web_too = await post(a, host, targetPolicy={"platformTypes": ["webPush", "android"]})
            await expect(["live", "webPush", "android"], change("created", 4, web_too))
            last = await post(a, host)
            await expect(list(streams), change("created", 5, last))
            assert [m["position"] for m in s_web.messages] == [0, 2, 4, 5]
            assert [m["position"] for m in s_ios.messages] == [0, 1, 2, 3, 5]


@pytest.mark.parametrize("how", ["delete", "deleteGroup", "expiry"])
async def test_tombstones_reach_every_platform(
    server: Server, app: RegisteredApp, how: str
) -> None:
    """Tombstones go to every device of the app, even of a notification its target policy kept
    from the device's platform (the notification and its policy are gone): the client ignores
    ids it does not know."""
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        ios, web = await subscribe(a, host, "iOS"), await subscribe(a, host, "webPush")
        async with (
            open_stream("ws", base, ios, token) as s_ios,
            open_stream("sse", base, web, token) as s_web,
        ):
            assert await s_ios.ready() == await s_web.ready() == 0
            extra: dict[str, Any] = {"groupName": "g"}
            if how == "expiry":
                extra = {"expirationDateTime": in_seconds(2)}
            only_ios = await post(a, host, targetPolicy={"platformTypes": ["iOS"]}, **extra)
            assert await next_change(s_ios) == change("created", 1, only_ios)
            if how == "delete":
                assert (await a.delete(f"{FEED}/{only_ios['id']}")).status_code == 204
            elif how == "deleteGroup":
                r = await a.post(f"{FEED}/deleteGroup", json={"groupName": "g"})
                assert r.json() == {"deletedCount": 1}
            kind = "expired" if how == "expiry" else "deleted"
            assert await next_change(s_ios) == removal(kind, 2, only_ios["id"])
            assert await next_change(s_web) == removal(kind, 2, only_ios["id"])
            everyone = await post(a, host)
            assert await next_change(s_ios) == change("created", 3, everyone)
            assert await next_change(s_web) == change("created", 3, everyone)
            assert [m["position"] for m in s_web.messages] == [0, 2, 3]


async def test_other_apps_changes_leave_gaps(
    server: Server, app: RegisteredApp, other_app: RegisteredApp
) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a, api(base, server.token(other_app, user)) as o:
        d = await subscribe(a, app.host_name)
        async with open_stream("ws", base, d, token) as s:
            assert await s.ready() == 0
            theirs = await post(o, other_app.host_name)
            await o.patch(f"{FEED}/{theirs['id']}", json={"readState": "read"})
            mine = await post(a, app.host_name)
            assert await next_change(s) == change("created", 3, mine)


async def test_stream_starts_at_the_current_position(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, host)
        for _ in range(3):
            await post(a, host)
        async with open_stream("ws", base, d, token, version="v1.0") as s:
            assert await s.ready() == 3
            n = await post(a, host)
            assert await next_change(s) == change("created", 4, n)
        async with open_stream("sse", base, d, token, version="v1.0") as s:
            assert await s.ready() == 4
            n = await post(a, host)
            assert await next_change(s) == change("created", 5, n)


async def test_sse_framing(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, host)
        async with open_stream("sse", base, d, token) as s:
            assert isinstance(s, SseStream)
            assert s.response.headers["content-type"].split(";")[0] == "text/event-stream"
            assert await s.ready() == 0
            assert s.lines[0] == "retry: 2000"
            assert s.retry == "2000"
            ready = next(f for f in s.frames if f.get("data") is not None)
            assert dict(ready.fields) == {"id": "0", "event": "ready", "data": ready.get("data")}
            n = await post(a, host)
            assert await next_change(s) == change("created", 1, n)
            created = [f for f in s.frames if f.get("event") == "created"]
            assert len(created) == 1 and created[0].get("id") == "1"
            assert {k for k, _ in created[0].fields} == {"id", "event", "data"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_keepalive(server: Server, app: RegisteredApp, protocol: str) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, app.host_name)
        async with open_stream(protocol, base, d, token) as s:
            assert await s.ready() == 0
            started = time.monotonic()
            assert await s.next(wait=2 * KEEPALIVE + 2, keepalive=True) == {"type": "keepalive"}
            assert time.monotonic() - started >= KEEPALIVE * 0.5
            if isinstance(s, SseStream):
                frame = s.frames[-1]
                assert frame.comments == ["keepalive"] and frame.fields == []
            # The stream is still live after it.
            n = await post(a, app.host_name)
            assert await next_change(s) == change("created", 1, n)


async def test_keepalives_due_together_go_out_spread_over_a_second(
    server: Server, app: RegisteredApp
) -> None:
    """Streams opened together fall due for a keep-alive together; the server sends those
    keep-alives spread over the next second, not in one burst (with thousands of streams, a
    burst of sends is what the deliveries made at that moment wait behind)."""
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a, contextlib.AsyncExitStack() as stack:
        ids = [await subscribe(a, app.host_name) for _ in range(30)]
        streams = await asyncio.gather(
            *(stack.enter_async_context(open_stream("ws", base, d, token)) for d in ids)
        )
        await asyncio.gather(*(s.ready() for s in streams))

        async def first_keepalive(s: Stream) -> float:
            assert await s.next(wait=2 * KEEPALIVE + 2, keepalive=True) == {"type": "keepalive"}
            return time.monotonic()

        arrived = sorted(await asyncio.gather(*(first_keepalive(s) for s in streams)))
    # Bursts: keep-alives less than 40 ms apart. All at once came in one or two (the ticker's
    # second may have begun while the streams were opening).
    bursts = 1 + sum(1 for a, b in zip(arrived, arrived[1:], strict=False) if b - a > 0.04)
    assert bursts >= 4, [round(t - arrived[0], 3) for t in arrived]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_access_token_in_the_query(server: Server, app: RegisteredApp, protocol: str) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, app.host_name)
        async with open_stream(protocol, base, d, token, query_token=True) as s:
            assert await s.ready() == 0
            n = await post(a, app.host_name)
            assert await next_change(s) == change("created", 1, n)
        with pytest.raises(Refused) as refused:
            async with open_stream(protocol, base, d, "garbage", query_token=True):
                pass
        assert refused.value.status == 401
        assert refused.value.json()["error"]["code"] == "InvalidAuthenticationToken"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_stream_refused_before_it_starts(
    server: Server, app: RegisteredApp, other_app: RegisteredApp, protocol: str
) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, app.host_name)
    cases: list[tuple[str, str | None, int, str]] = [
        (d, "not-a-token", 401, "InvalidAuthenticationToken"),
        (d, server.expired_token(app, user), 401, "InvalidAuthenticationToken"),
        (d, None, 401, "InvalidAuthenticationToken"),
        (d, server.token(app, new_user()), 404, "itemNotFound"),  # another user's subscription
        (d, server.token(other_app, user), 404, "itemNotFound"),  # another app's
        (str(uuid.uuid4()), token, 404, "itemNotFound"),  # none at all
    ]
    for sub, tok, status, code in cases:
        with pytest.raises(Refused) as refused:
            async with open_stream(protocol, base, sub, tok):
                pass
        assert refused.value.status == status, (sub, tok, refused.value)
        error = refused.value.json()["error"]
        assert error["code"] == code and error["message"], error
        assert error["innerError"]["request-id"] == refused.value.headers["request-id"]
        if status == 401 and protocol == "sse":
            assert refused.value.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("position", ["abc", "-1", "1.5", ""])
async def test_malformed_resume_position_is_a_bad_request(
    server: Server, app: RegisteredApp, protocol: str, position: str
) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, app.host_name)
    ways: list[dict[str, Any]] = [{"after": position}]
    if protocol == "sse" and position:
        ways.append({"last_event_id": position})
    for kw in ways:
        with pytest.raises(Refused) as refused:
            async with open_stream(protocol, base, d, token, **kw):
                pass
        assert refused.value.status == 400, (kw, refused.value)
        assert refused.value.json()["error"]["code"] == "invalidRequest"


async def test_idempotent_replay_and_batch(server: Server, app: RegisteredApp) -> None:
    """A replayed Idempotency-Key request writes nothing, so devices see nothing; a notification
    created inside $batch reaches them like any other."""
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, host)
        async with open_stream("ws", base, d, token) as s:
            assert await s.ready() == 0
            body = notification_body(host)
            headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
            first = await a.post(FEED, json=body, headers=headers)
            again = await a.post(FEED, json=body, headers=headers)
            assert first.status_code == again.status_code == 201
            assert await next_change(s) == change("created", 1, first.json())
            inner = notification_body(host)
            r = await a.post(
                "/beta/$batch",
                json={
                    "requests": [
                        {
                            "id": "1",
                            "method": "POST",
                            "url": "/me/notifications",
                            "headers": {"Content-Type": "application/json"},
                            "body": inner,
                        }
                    ]
                },
            )
            assert r.status_code == 200, r.text
            response = r.json()["responses"][0]
            assert response["status"] == 201, response
            created = (await a.get(f"{FEED}/{response['body']['id']}")).json()
            assert await next_change(s) == change("created", 2, created)


# =============================================================================================
# Resume


RESUME = [("ws", "after"), ("sse", "last-event-id"), ("sse", "after")]


@pytest.mark.parametrize(("protocol", "how"), RESUME)
async def test_offline_device_catches_up_by_resuming(
    server: Server, app: RegisteredApp, protocol: str, how: str
) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a, api(base, server.token(app, None)) as srv:
        d = await subscribe(a, host)
        async with open_stream(protocol, base, d, token) as s:
            assert await s.ready() == 0
            n0 = await post(a, host)
            seen = await next_change(s)
            assert seen == change("created", 1, n0)
        last = seen["position"]
        # Offline: five posts, an update, a delete (by the app server, not by this device).
        users = f"/beta/users/{user}/notifications"
        ns = [await post(srv, host, users) for _ in range(5)]  # positions 2..6
        r = await srv.patch(f"{users}/{n0['id']}", json={"readState": "read"})  # 7
        assert r.status_code == 200
        n0_read = r.json()
        assert (await srv.delete(f"{users}/{ns[1]['id']}")).status_code == 204  # 8
        kw: dict[str, Any] = {"after": last} if how == "after" else {"last_event_id": last}
        async with open_stream(protocol, base, d, token, **kw) as s:
            assert await s.ready() == last
            replay = [await next_change(s) for _ in range(6)]
            # The created change of the notification deleted since is skipped; its tombstone
            # follows.
            assert replay == [
                change("created", 2, ns[0]),
                change("created", 4, ns[2]),
                change("created", 5, ns[3]),
                change("created", 6, ns[4]),
                change("updated", 7, n0_read),
                removal("deleted", 8, ns[1]["id"]),
            ]
            # Then live continues, with nothing repeated in between.
            n6 = await post(srv, host, users)
            assert await next_change(s) == change("created", 9, n6)
            assert [m["position"] for m in s.messages] == [1, 2, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_resume_skips_the_devices_own_changes(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, host)
        n = await post(a, host)  # 1
        mine = {"X-UNS-ID": d}
        r = await a.patch(f"{FEED}/{n['id']}", json={"readState": "read"}, headers=mine)  # 2
        assert r.status_code == 200, r.text
        m = await post(a, host, headers=mine)  # 3
        r = await a.patch(f"{FEED}/{n['id']}", json={"userActionState": "dismissed"})  # 4
        assert r.status_code == 200, r.text
        async with open_stream(protocol, base, d, token, after=0) as s:
            assert await s.ready() == 0
            # (A replayed created change carries the notification as it is now or as it was;
            # the contract does not say which, so only its identity is checked.)
            first = await next_change(s)
            assert (first["type"], first["position"], first["id"]) == ("created", 1, n["id"])
            assert await next_change(s) == change("updated", 4, r.json())
            last = await post(a, host)
            assert await next_change(s) == change("created", 5, last)
            assert m["id"] not in {x.get("id") for x in s.messages}


# =============================================================================================
# Delta


def test_delta_first_sync_pages_then_only_changes(
    server: Server, app: RegisteredApp, other_app: RegisteredApp
) -> None:
    user = new_user()
    c = server.client(server.token(app, user))
    theirs = server.client(server.token(other_app, user))
    stranger = server.client(server.token(app, new_user()))
    assert theirs.post(FEED, json=notification_body(other_app.host_name)).status_code == 201  # 1
    stranger.post(FEED, json=notification_body(app.host_name))
    ns = [c.post(FEED, json=notification_body(app.host_name)).json() for _ in range(6)]  # 2..7
    soon = c.post(FEED, json=notification_body(app.host_name, expirationDateTime=in_seconds(3)))
    assert soon.status_code == 201  # 8
    expiring = soon.json()
    pages, link = delta_sync(c, DELTA, page_size=2)
    assert [[x["id"] for x in p] for p in pages] == [
        [ns[0]["id"], ns[1]["id"]],
        [ns[2]["id"], ns[3]["id"]],
        [ns[4]["id"], ns[5]["id"]],
        [expiring["id"]],
    ]
    items = [without_context(x) for p in pages for x in p]
    assert items == [without_context(n) for n in [*ns, expiring]]
    assert delta_token(link) == "8"

    # Changes since: an update, a delete, a new one changed twice, one created and deleted, the
    # expiry of another, and a change of another app (not included).
    r = c.patch(f"{FEED}/{ns[0]['id']}", json={"readState": "read"})  # 9
    read = r.json()
    assert c.delete(f"{FEED}/{ns[1]['id']}").status_code == 204  # 10
    n6 = c.post(FEED, json=notification_body(app.host_name)).json()  # 11
    c.patch(f"{FEED}/{n6['id']}", json={"readState": "read"})  # 12
    n6_final = c.patch(f"{FEED}/{n6['id']}", json={"userActionState": "dismissed"}).json()  # 13
    n7 = c.post(FEED, json=notification_body(app.host_name)).json()  # 14
    assert c.delete(f"{FEED}/{n7['id']}").status_code == 204  # 15
    theirs.post(FEED, json=notification_body(other_app.host_name))  # 16
    wait = parse(expiring["expirationDateTime"]) - datetime.now(UTC)
    time.sleep(max(0.0, wait.total_seconds()) + 4 * SWEEP)  # 17: the expiry tombstone
    pages, link2 = delta_sync(c, link)
    assert len(pages) == 1
    items = [without_context(x) for x in pages[0]]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_id.setdefault(item["id"], []).append(item)
    assert {k: len(v) for k, v in by_id.items()} == {
        ns[0]["id"]: 1,
        ns[1]["id"]: 1,
        n6["id"]: 1,
        n7["id"]: 1,
        expiring["id"]: 1,
    }
    assert by_id[ns[0]["id"]] == [without_context(read)]
    assert by_id[ns[1]["id"]] == [{"id": ns[1]["id"], "@removed": REMOVED}]
    assert by_id[n6["id"]] == [without_context(n6_final)]
    assert by_id[n7["id"]] == [{"id": n7["id"], "@removed": REMOVED}]
    assert by_id[expiring["id"]] == [{"id": expiring["id"], "@removed": REMOVED}]
    assert delta_token(link2) == "17"
    # Nothing since: an empty page and the same position.
    pages, link3 = delta_sync(c, link2)
    assert pages == [[]] and delta_token(link3) == "17"


def test_delta_for_app_only_tokens(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    owner = server.client(server.token(app, user))
    s = create_sub(owner, app.host_name)
    ns = [owner.post(FEED, json=notification_body(app.host_name)).json() for _ in range(3)]
    c = server.client(server.token(app, None))
    pages, link = delta_sync(c, f"/beta/users/{user}/notifications/delta")
    assert [x["id"] for p in pages for x in p] == [n["id"] for n in ns]
    assert delta_token(link) == "3"
    assert f"/users/{user}/notifications/delta" in link
    c.headers["X-UNS-ID"] = s["id"]
    pages, link = delta_sync(c, DELTA)
    assert [x["id"] for p in pages for x in p] == [n["id"] for n in ns]
    del c.headers["X-UNS-ID"]
    assert_graph_error(c.get(DELTA), 400, "invalidRequest", "X-UNS-ID")


@pytest.mark.parametrize(
    "query",
    [
        "$deltatoken=garbage",
        "$deltatoken=-1",
        "$deltatoken=1.5",
        "$deltatoken=",
        "$deltatoken=1000000",
        "$top=1",
        "$filter=readState eq 'read'",
        "$select=bogus",  # $select itself is supported (tests/test_conformance.py)
        "top=1",
        "$orderby=createdDateTime",
        "$count=true",
        "$expand=x",
    ],
)
def test_delta_refuses_bad_tokens_and_other_options(
    server: Server, app: RegisteredApp, query: str
) -> None:
    c = server.client(server.token(app, new_user()))
    c.post(FEED, json=notification_body(app.host_name))
    r = c.get(f"{DELTA}?{query}")
    assert_graph_error(r, 400, "invalidRequest")


async def test_delta_token_resumes_a_stream(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    c = server.client(token)
    for _ in range(3):
        c.post(FEED, json=notification_body(host))
    _, link = delta_sync(c, DELTA)
    position = delta_token(link)
    assert position == "3"
    async with api(base, token) as a:
        d = await subscribe(a, host)
        n4, n5 = await post(a, host), await post(a, host)
        r = await a.patch(f"{FEED}/{n4['id']}", json={"readState": "read"})
        for protocol in PROTOCOLS:
            async with open_stream(protocol, base, d, token, after=position) as s:
                assert await s.ready() == 3
                assert await next_change(s) == change("created", 4, r.json())
                assert await next_change(s) == change("created", 5, n5)
                assert await next_change(s) == change("updated", 6, r.json())
        async with open_stream("ws", base, d, token, after=6) as s:
            assert await s.ready() == 6
            n7 = await post(a, host)
            assert await next_change(s) == change("created", 7, n7)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_history_too_old_needs_a_resync(
    forgetful: Server, forgetful_app: RegisteredApp, protocol: str
) -> None:
    server, app = forgetful, forgetful_app
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    c = server.client(token)
    ns = [c.post(FEED, json=notification_body(host)).json() for _ in range(3)]
    s = create_sub(c, host)
    await asyncio.sleep(2.5)  # older than change_retention, and swept
    assert_graph_error(c.get(f"{DELTA}?$deltatoken=1"), 410, "syncStateNotFound")
    pages, link = delta_sync(c, DELTA)
    assert [x["id"] for p in pages for x in p] == [n["id"] for n in ns]
    assert delta_token(link) == "3"
    pages, _ = delta_sync(c, link)
    assert pages == [[]]
    # Before the stream starts, so an ordinary Graph error (WebSocket: the refused handshake).
    for kw in ({"after": 1}, {"last_event_id": 2} if protocol == "sse" else {"after": 2}):
        with pytest.raises(Refused) as refused:
            async with open_stream(protocol, base, s["id"], token, **kw):
                pass
        assert refused.value.status == 410, refused.value
        assert refused.value.json()["error"]["code"] == "syncStateNotFound"
    async with open_stream(protocol, base, s["id"], token, after=3) as stream:
        assert await stream.ready() == 3


# =============================================================================================
# Closing


def assert_closing(message: dict[str, Any], reason: str) -> None:
    assert set(message) == {"type", "reason", "message"}, message
    assert message["type"] == "closing" and message["reason"] == reason, message
    assert isinstance(message["message"], str) and message["message"], message


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_deleting_the_subscription_closes_its_stream(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a:
        d, other = await subscribe(a, app.host_name), await subscribe(a, app.host_name)
        async with (
            open_stream(protocol, base, d, token) as s,
            open_stream(protocol, base, other, token) as t,
        ):
            assert await s.ready() == await t.ready() == 0
            assert (await a.delete(f"{SUBS}/{d}")).status_code == 204
            messages, end = await s.until_end()
            assert len(messages) == 1, messages
            assert_closing(messages[0], "subscriptionGone")
            if protocol == "ws":
                assert end.code == 4404
            # The other device's stream is unaffected.
            n = await post(a, app.host_name)
            assert await next_change(t) == change("created", 1, n)
        with pytest.raises(Refused) as refused:
            async with open_stream(protocol, base, d, token):
                pass
        assert refused.value.status == 404


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_losing_the_push_channel_to_another_user_closes_the_stream(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    """Bob registers the Web Push endpoint of alice's browser (a shared machine): alice's
    subscription is deleted, and so her open stream on it must close, not go on receiving."""
    alice, bob = new_user(), new_user()
    base, host = server.base_url, app.host_name
    ta, tb = server.token(app, alice), server.token(app, bob)
    channel = webpush_channel()
    async with api(base, ta) as a, api(base, tb) as b:
        r = await a.post(SUBS, json=subscription_body(host, "webPush", pushChannel=channel))
        assert r.status_code == 201
        mine = r.json()["id"]
        async with open_stream(protocol, base, mine, ta) as s:
            assert await s.ready() == 0
            r = await b.post(SUBS, json=subscription_body(host, "webPush", pushChannel=channel))
            assert r.status_code == 201 and r.json()["id"] != mine
            messages, end = await s.until_end()
            assert len(messages) == 1, messages
            assert_closing(messages[0], "subscriptionGone")
            if protocol == "ws":
                assert end.code == 4404
        assert (await a.get(f"{SUBS}/{mine}")).status_code == 404


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_expiring_subscription_closes_its_stream(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, app.host_name, expirationDateTime=in_seconds(3))
        async with open_stream(protocol, base, d, token) as s:
            assert await s.ready() == 0
            messages, end = await s.until_end()
            assert len(messages) == 1, messages
            assert_closing(messages[0], "subscriptionGone")
            if protocol == "ws":
                assert end.code == 4404
        with pytest.raises(Refused) as refused:
            async with open_stream(protocol, base, d, token):
                pass
        assert refused.value.status == 404
        assert refused.value.json()["error"]["code"] == "itemNotFound"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_token_expiry_closes_the_stream(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    user = new_user()
    base = server.base_url
    async with api(base, server.token(app, user)) as a:
        d = await subscribe(a, app.host_name)
    # Past its exp but inside the verifier's 60 s clock-skew leeway: accepted at the handshake;
    # the server closes the stream at exp (at once) or at exp + leeway (within 5 s).
    token = token_expiring_at(server, app, user, int(time.time()) - 55)
    async with open_stream(protocol, base, d, token) as s:
        messages, end = await s.until_end(wait=WAIT)
    assert messages, "the stream ended without a closing message"
    assert_closing(messages[-1], "tokenExpired")
    assert [m["type"] for m in messages[:-1]] in ([], ["ready"])
    if protocol == "ws":
        assert end.code == 4401


async def post_many(base: str, token: str, host: str, count: int, size: int) -> list[str]:
    ids: list[str] = []
    numbers = iter(range(count))

    async def worker(a: httpx.AsyncClient) -> None:
        for i in numbers:
            body = notification_body(host, payload={"rawContent": f"{i:06d}" + "x" * size})
            r = await a.post(FEED, json=body)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

    async with api(base, token) as a:
        await asyncio.gather(*(worker(a) for _ in range(16)))
    return ids


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_client_too_far_behind_is_closed_and_resumes(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    """A client that stops reading falls behind; past 1,000 changes the server sends `closing`
    `tooSlow` (WebSocket 4408) and ends the stream; resuming from the last position seen
    delivers the rest."""
    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a:
        d = await subscribe(a, host)
    count, size = 2500, 3900  # ~10 MB of messages the client does not read while they are made
    messages: list[dict[str, Any]] = []
    code: int | None = None
    if protocol == "ws":
        from tests.devices import ws_url

        # A sans-I/O WebSocket client over a plain socket with a small receive buffer, so that
        # nothing reads while the posts are made (a client library keeps reading in the
        # background, within its own buffers).
        url = f"{ws_url(base)}{SUBS}/{d}/stream?access_token={token}"
        ws = ClientProtocol(parse_uri(url))
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.settimeout(WAIT)
            sock.connect(("127.0.0.1", server.settings.port))
            ws.send_request(ws.connect())
            sock.sendall(b"".join(ws.data_to_send()))
            frames: list[Frame] = []
            while not frames:  # the handshake response, then `ready`
                ws.receive_data(sock.recv(65536))
                frames += [e for e in ws.events_received() if isinstance(e, Frame)]
            assert json.loads(frames[0].data) == {"type": "ready", "position": 0}
            ids = await post_many(base, token, host, count, size)
            caught_up = False  # a keepalive: all sent and still open, never found behind
            while ws.state is not State.CLOSED and not caught_up:
                data = await asyncio.to_thread(sock.recv, 65536)
                if not data:
                    break
                ws.receive_data(data)
                sock.sendall(b"".join(ws.data_to_send()))  # pongs, the close reply
                for event in ws.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                        message = json.loads(event.data)
                        caught_up = caught_up or message["type"] == "keepalive"
                        if message["type"] != "keepalive":
                            messages.append(message)
        finally:
            sock.close()  # also when a post fails: a leaked socket fails a later test's setup
        code = ws.close_rcvd.code if ws.close_rcvd is not None else None
    else:
        timeout = httpx.Timeout(WAIT, read=None)
        async with httpx.AsyncClient(base_url=base, timeout=timeout, trust_env=False) as c:
            headers = {"Authorization": f"Bearer {token}"}
            async with c.stream("GET", f"{SUBS}/{d}/stream", headers=headers) as response:
                assert response.status_code == 200
                ids = await post_many(base, token, host, count, size)
                lines = response.aiter_lines()
                with contextlib.suppress(StopAsyncIteration, httpx.TransportError):
                    while True:
                        line = await asyncio.wait_for(anext(lines), WAIT)
                        if line.startswith(": keepalive"):
                            break
                        if line.startswith("data:"):
                            messages.append(json.loads(line[5:]))
        assert messages[0] == {"type": "ready", "position": 0}
        messages = messages[1:]
    changes = [m for m in messages if m["type"] == "created"]
    assert len(changes) < count, f"{protocol}: all {count} sent, no tooSlow ({code=})"
    assert messages[-1]["type"] == "closing" and messages[-1]["reason"] == "tooSlow", messages[-1]
    assert len(changes) == len(messages) - 1
    if protocol == "ws":
        assert code == 4408
    positions = [m["position"] for m in changes]
    assert positions == list(range(1, len(changes) + 1))
    last = positions[-1] if positions else 0
    # Resuming from the last position seen delivers exactly the rest, in order.
    async with open_stream(protocol, base, d, token, after=last) as s:
        assert await s.ready() == last
        rest = [await s.next() for _ in range(count - last)]
    assert [m["position"] for m in rest] == list(range(last + 1, count + 1))
    assert {m["id"] for m in changes + rest} == set(ids)


# =============================================================================================
# Cross-device conflicts


def test_concurrent_writes_merge_field_by_field_and_if_match_refuses_stale(
    server: Server, app: RegisteredApp
) -> None:
    user = new_user()
    c = server.client(server.token(app, user))
    d1, d2 = create_sub(c, app.host_name), create_sub(c, app.host_name)
    n = c.post(FEED, json=notification_body(app.host_name)).json()
    url = f"{FEED}/{n['id']}"
    r1 = c.patch(url, json={"userActionState": "dismissed"}, headers={"X-UNS-ID": d1["id"]})
    r2 = c.patch(url, json={"readState": "read"}, headers={"X-UNS-ID": d2["id"]})
    assert r1.status_code == r2.status_code == 200
    assert r2.json()["userActionState"] == "dismissed" and r2.json()["readState"] == "read"
    stale = c.patch(
        url,
        json={"readState": "unread"},
        headers={"X-UNS-ID": d1["id"], "If-Match": r1.json()["@odata.etag"]},
    )
    assert_graph_error(stale, 412, "preconditionFailed")
    assert without_context(c.get(url).json()) == without_context(r2.json())


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_metrics_count_open_streams_and_dispatched_changes(
    server: Server, app: RegisteredApp, protocol: str
) -> None:
    def sample(text: str, name: str) -> float:
        """A sample's value; 0 before the labelled series first appears."""
        line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
        return 0.0 if line is None else float(line.rsplit(" ", 1)[1])

    label = "websocket" if protocol == "ws" else "sse"
    gauge = f'herald_live_streams{{protocol="{label}"}}'
    user = new_user()
    token, base = server.token(app, user), server.base_url
    async with api(base, token) as a, httpx.AsyncClient(base_url=base) as plain:
        d = await subscribe(a, app.host_name)
        before = (await plain.get("/metrics")).text
        async with open_stream(protocol, base, d, token) as s:
            assert await s.ready() == 0
            n = await post(a, app.host_name)
            assert await next_change(s) == change("created", 1, n)
            during = (await plain.get("/metrics")).text
        assert sample(during, gauge) == sample(before, gauge) + 1
        # Counted once the outbox entry is removed, just after the change was published.
        dispatched = "herald_dispatched_changes_total"
        deadline = time.monotonic() + WAIT
        while (
            sample((await plain.get("/metrics")).text, dispatched) < sample(before, dispatched) + 1
        ):
            assert time.monotonic() < deadline, "the dispatched change is not counted"
            await asyncio.sleep(0.05)
        while sample((await plain.get("/metrics")).text, gauge) != sample(before, gauge):
            assert time.monotonic() < deadline, "the closed stream is still counted"
            await asyncio.sleep(0.05)


async def test_a_client_that_reads_nothing_is_dropped(server: Server, app: RegisteredApp) -> None:
    """An SSE client that never reads again cannot even be sent `closing`: once it is too far
    behind, the server drops the connection (and its session) after a grace period."""

    def streams(text: str) -> float:
        line = next(
            (x for x in text.splitlines() if x.startswith('herald_live_streams{protocol="sse"}')),
            None,
        )
        return 0.0 if line is None else float(line.rsplit(" ", 1)[1])

    user = new_user()
    token, host, base = server.token(app, user), app.host_name, server.base_url
    async with api(base, token) as a, httpx.AsyncClient(base_url=base) as plain:
        d = await subscribe(a, host)
        before = streams((await plain.get("/metrics")).text)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        try:
            sock.connect(("127.0.0.1", server.settings.port))
        except OSError:
            sock.close()
            raise
        request = f"GET {SUBS}/{d}/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
        sock.sendall(request.encode() + b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        try:
            assert streams((await plain.get("/metrics")).text) == before + 1
            await post_many(base, token, host, 2500, 3900)  # ~10 MB it will never read
            deadline = time.monotonic() + 30
            while streams((await plain.get("/metrics")).text) != before:
                assert time.monotonic() < deadline, "the stuck stream was never dropped"
                await asyncio.sleep(0.25)
        finally:
            sock.close()
