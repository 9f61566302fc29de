"""The pull feed, `GET /beta/notificationChanges`, against a running server whose clock the test
moves (expiry and retention without sleeping): cursor paging, per-user order, every kind of
change (created, updated, deleted, expired), and Graph errors for bad and expired cursors. And,
on this server with the default settings' SSRF guard, that a webhook may not name a private
address (tests/test_webhooks.py has delivery)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from herald.api.app import create_app
from herald.server import Server as HeraldServer
from herald.server import config
from herald.settings import Settings
from tests.conftest import RegisteredApp, Server, make_settings

HOUR = timedelta(hours=1)
FEED = "/beta/notificationChanges"


class Clock:
    """The server's clock: real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def serve(data: Path, clock: Clock, store_url: str = "") -> Iterator[Server]:
    # Webhooks keep the default guard here (the session's server lets them reach 127.0.0.1).
    settings = make_settings(
        data,
        store_url=store_url,
        sweep_interval=0.1,
        change_retention=6 * 3600,
        webhook_allow_private_endpoints=Settings().webhook_allow_private_endpoints,
    )
    server = HeraldServer(
        config(create_app(settings, clock=clock), "127.0.0.1", settings.port, log_level="warning")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "Herald did not start"
        time.sleep(0.02)
    s = Server(settings, f"http://127.0.0.1:{settings.port}")
    try:
        yield s
    finally:
        s.close_clients()
        server.should_exit = True
        thread.join(10)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def timed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Clock]]:
    clock = Clock()
    data = tmp_path_factory.mktemp("feed")
    if request.param == "sqlite":
        for s in serve(data, clock):
            yield s, clock
        return
    from tests.pg import fresh_database

    for url in fresh_database():
        for s in serve(data, clock, url):
            yield s, clock


def notification(app: RegisteredApp, anid: str, expires: datetime | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetHostName": app.host_name,
        "appNotificationId": anid,
        "payload": {"visualContent": {"title": anid}},
    }
    if expires is not None:
        body["expirationDateTime"] = expires.isoformat().replace("+00:00", "Z")
    return body


def post(c: httpx.Client, app: RegisteredApp, anid: str, **kw: Any) -> str:
    r = c.post("/beta/me/notifications", json=notification(app, anid, **kw))
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def read_all(c: httpx.Client, url: str, page: int = 2) -> tuple[list[dict[str, Any]], str]:
    """Every event from `url` on, following nextLinks; (events, the deltaLink)."""
    events: list[dict[str, Any]] = []
    while True:
        r = c.get(url, headers={"Prefer": f"odata.maxpagesize={page}"})
        assert r.status_code == 200, r.text
        assert r.headers["preference-applied"] == f"odata.maxpagesize={page}"
        body = r.json()
        assert len(body["value"]) <= page
        events += body["value"]
        if "@odata.deltaLink" in body:
            assert "@odata.nextLink" not in body
            return events, body["@odata.deltaLink"]
        url = body["@odata.nextLink"]


def summary(events: list[dict[str, Any]], user: str) -> list[tuple[int, str, str]]:
    return [
        (e["position"], e["changeType"], e["notificationId"]) for e in events if e["userId"] == user
    ]


def test_the_feed_pages_in_order_with_every_kind_of_change(timed: tuple[Server, Clock]) -> None:
    server, clock = timed
    app, other = server.register(), server.register()
    u1, u2 = f"u1-{uuid.uuid4()}", f"u2-{uuid.uuid4()}"
    c1, c2 = server.client(server.token(app, u1)), server.client(server.token(app, u2))
    feed = server.client(server.token(app, None))
    first = feed.get(FEED)  # the first read starts the app's feed
    assert first.status_code == 200 and first.json()["value"] == []
    n1 = post(c1, app, "n1")
    n2 = post(c2, app, "n2")
    n3 = post(c1, app, "n3", expires=clock() + HOUR)
    assert c1.patch(f"/beta/me/notifications/{n1}", json={"readState": "read"}).is_success
    r = c2.patch(f"/beta/me/notifications/{n2}", json={"userActionState": "dismissed"})
    assert r.is_success
    assert post(c1, app, "n1") == n1  # the same appNotificationId: content replaced
    assert c2.delete(f"/beta/me/notifications/{n2}").status_code == 204
    post(server.client(server.token(other, u1)), other, "elsewhere")
    clock.offset += 2 * HOUR  # n3 expires; the sweeper (every 0.1 s) reports it
    deadline = time.monotonic() + 10
    while True:
        events, delta = read_all(feed, FEED)
        if any(e["changeType"] == "expired" for e in events) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert summary(events, u1) == [
        (1, "created", n1),
        (2, "created", n3),
        (3, "updated", n1),
        (4, "updated", n1),
        (6, "expired", n3),  # positions are per user: 5 is u1's change in the other app
    ]
    assert summary(events, u2) == [(1, "created", n2), (2, "updated", n2), (3, "deleted", n2)]
    assert len(events) == 8  # nothing of the other app
    assert [e["sequence"] for e in events] == sorted({e["sequence"] for e in events})
    by_position = {(e["userId"], e["position"]): e for e in events}
    assert by_position[u1, 4]["contentReplaced"] and not by_position[u1, 3]["contentReplaced"]
    # The notification as it is now: n1 was replaced (unread again), n2 and n3 are gone.
    assert by_position[u1, 3]["notification"]["readState"] == "unread"
    assert by_position[u1, 3]["notification"]["appNotificationId"] == "n1"
    assert by_position[u2, 1]["notification"] is None
    assert by_position[u1, 6]["notification"] is None
    # The deltaLink gives what comes next, and only that.
    assert read_all(feed, delta)[0] == []
    n4 = post(c2, app, "n4")
    later, delta2 = read_all(feed, delta)
    assert summary(later, u2) == [(4, "created", n4)] and len(later) == 1
    assert read_all(feed, delta2)[0] == []


def test_changes_are_recorded_from_the_first_read_on(timed: tuple[Server, Clock]) -> None:
    server, _ = timed
    app = server.register()
    user = f"u-{uuid.uuid4()}"
    c = server.client(server.token(app, user))
    post(c, app, "unrecorded")  # before the app used its feed
    feed = server.client(server.token(app, None))
    assert read_all(feed, FEED)[0] == []
    nid = post(c, app, "recorded")
    assert summary(read_all(feed, FEED)[0], user) == [(2, "created", nid)]


def test_latest_starts_at_the_end(timed: tuple[Server, Clock]) -> None:
    server, _ = timed
    app = server.register()
    user = f"u-{uuid.uuid4()}"
    c = server.client(server.token(app, user))
    feed = server.client(server.token(app, None))
    assert read_all(feed, FEED)[0] == []
    post(c, app, "before")
    body = feed.get(FEED, params={"$deltatoken": "latest"}).json()
    assert body["value"] == [] and "@odata.deltaLink" in body
    nid = post(c, app, "after")
    events, _ = read_all(feed, body["@odata.deltaLink"])
    assert summary(events, user) == [(2, "created", nid)]


def test_bad_cursors_and_callers_get_graph_errors(timed: tuple[Server, Clock]) -> None:
    server, _ = timed
    app = server.register()
    feed = server.client(server.token(app, None))
    never = base64.urlsafe_b64encode(b"f1.999999999999").decode().rstrip("=")
    for params in (
        {"$skiptoken": "not-a-token"},
        {"$deltatoken": "MTIz"},
        {"$deltatoken": never},
        {"$top": "5"},
        {"$skiptoken": "a", "$deltatoken": "b"},
    ):
        r = feed.get(FEED, params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["code"] == "invalidRequest"
    user = server.client(server.token(app, "someone"))
    r = user.get(FEED)
    assert r.status_code == 403 and r.json()["error"]["code"] == "accessDenied"
    assert server.client().get(FEED).status_code == 401


def test_a_cursor_behind_the_retained_history_is_gone(timed: tuple[Server, Clock]) -> None:
    server, clock = timed
    app = server.register()
    user = f"u-{uuid.uuid4()}"
    c = server.client(server.token(app, user))
    feed = server.client(server.token(app, None))
    post(c, app, "old")
    _, delta = read_all(feed, FEED)
    post(c, app, "older")
    _, stale = read_all(feed, delta)
    clock.offset += 7 * HOUR  # past change_retention (6 h): the feed is pruned
    post(c, app, "new")
    deadline = time.monotonic() + 10
    while (r := feed.get(delta)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.status_code == 410, r.text
    error = r.json()["error"]
    assert error["code"] == "syncStateNotFound" and "without a token" in error["message"]
    fresh, _ = read_all(feed, FEED)  # starting again works
    assert [e["notification"]["appNotificationId"] for e in fresh if e["userId"] == user] == ["new"]
    del stale


def test_a_webhook_to_a_private_address_is_refused(timed: tuple[Server, Clock]) -> None:
    server, _ = timed
    assert not server.settings.webhook_allow_private_endpoints  # the default
    c = server.client(server.token(server.register(), None))
    for url in (
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
        "https://[::ffff:192.168.0.1]/hook",
        "https://localhost/hook",
        "http://hooks.example.net/hook",  # not https
    ):
        r = c.post("/beta/notificationWebhooks", json={"url": url})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["code"] == "invalidRequest", url
    assert c.get("/beta/notificationWebhooks").json()["value"] == []
