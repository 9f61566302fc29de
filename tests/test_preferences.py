"""Notification preferences end to end (docs/api.md "Notification preferences", docs/push.md
"Preferences and quiet hours"): a real Herald (SQLite, then PostgreSQL) with a clock the test
moves, pushing over real HTTPS to the verifying stand-ins (tests/standins).

Negative checks ("X was not pushed") use a barrier, as tests/test_push.py does: a later push the
same device does get. Deliveries are claimed earliest-due first, so anything queued for it before
the barrier would have arrived no later than the barrier itself."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from herald.api.app import create_app
from herald.server import Server as HeraldServer
from herald.server import config
from herald.settings import Settings
from tests.clock import Clock
from tests.conftest import RegisteredApp, Server, make_settings
from tests.devices import assert_graph_error, open_stream
from tests.pushes import (
    Device,
    Providers,
    User,
    configure_app,
    expires_in,
    messages,
    providers,
    stop_providers,
    wait_for,
)
from tests.standins import TlsFiles, make_tls

PREFS = "/beta/me/notificationPreferences"
ZONE = "America/New_York"
DAY = 86_400  # notifications outlive every clock jump here


class Running:
    """Herald in a thread with the test's clock; `restart` stops it and starts it again on the
    same data and store (what a restart of the process keeps: the store)."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings, self.clock = settings, clock
        self.server: HeraldServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        app = create_app(self.settings, clock=self.clock)
        server = HeraldServer(config(app, "127.0.0.1", self.settings.port, log_level="warning"))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "Herald did not start"
            time.sleep(0.02)
        self.server, self.thread = server, thread

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("prefs-tls"))


@pytest.fixture(scope="module")
def stand(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Providers]:
    running = providers(tls, tmp_path_factory.mktemp("prefs-credentials"))
    try:
        yield running
    finally:
        stop_providers(running)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def herald(
    request: pytest.FixtureRequest, stand: Providers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Running]]:
    """One Herald per store for the module, with its own clock and a short release interval."""
    data = tmp_path_factory.mktemp("prefs")
    urls: Iterator[str | None] = iter([None])
    if request.param == "postgres":
        from tests.pg import fresh_database

        urls = fresh_database()
    for url in urls:
        extra = {"store_url": url} if url else {}
        settings = make_settings(
            data, **stand.settings(quiet_release_interval=0.1, sweep_interval=3600.0), **extra
        )
        running = Running(settings, Clock())
        running.start()
        server = Server(settings, f"http://127.0.0.1:{settings.port}")
        try:
            yield server, running
        finally:
            server.close_clients()
            running.stop()


@pytest.fixture
def app(herald: tuple[Server, Running], stand: Providers) -> RegisteredApp:
    return configure_app(herald[0], stand)


def set_prefs(user: User, body: dict[str, Any], status: int = 200) -> httpx.Response:
    r = user.me.patch(PREFS, json=body)
    assert r.status_code == status, r.text
    return r


def quiet_now(clock: Clock, allow_high: bool, zone: str = ZONE) -> dict[str, Any]:
    """Quiet hours around Herald's present moment in `zone` (an hour either side)."""
    local = clock().astimezone(ZoneInfo(zone))
    return {
        "timeZone": zone,
        "startTime": (local - timedelta(hours=1)).strftime("%H:%M"),
        "endTime": (local + timedelta(hours=1)).strftime("%H:%M"),
        "allowHighPriority": allow_high,
    }


def notify(user: User, **fields: Any) -> dict[str, Any]:
    """A notification that outlives every clock jump here; of priority None unless told (a
    visual notification without one is High, as in Graph)."""
    return user.notify(**{"expirationDateTime": expires_in(DAY), "priority": "None", **fields})


def distinct(docs: list[Any]) -> list[dict[str, Any]]:
    """Each message once: a push whose answer came too late for Herald (a loaded machine, the
    2 s push timeout) is sent again, and the stand-in records both (pushes are at least once)."""
    seen: set[tuple[str, str, int]] = set()
    out = []
    for m in docs:
        key = (m["type"], m["id"], m["position"])
        if key not in seen:
            seen.add(key)
            out.append(dict(m))
    return out


def sent(device: Device) -> list[dict[str, Any]]:
    """The device's distinct messages in change order."""
    return distinct(messages(device))


def pushed(device: Device) -> list[dict[str, Any]]:
    """The device's distinct messages in the order they arrived (a summary carries the position
    of the newest notification it counts, which may be older than an alert let through
    meanwhile)."""
    assert device.standin is not None
    return distinct([d.message for d in device.standin.accepted(device.target) if d.message])


def arrived(device: Device, count: int) -> list[dict[str, Any]]:
    """Wait until the device got `count` distinct messages."""
    return wait_for(lambda: _at_least(pushed(device), count), f"{count} pushes to {device.id}")


def _at_least(docs: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    return docs if len(docs) >= count else None


def titles(device: Device) -> list[tuple[str, str]]:
    return [(m["type"], m.get("title", "")) for m in pushed(device)]


# -- muting ---------------------------------------------------------------------------------------


async def test_a_muted_group_is_stored_and_synced_but_not_pushed(
    herald: tuple[Server, Running], app: RegisteredApp, stand: Providers
) -> None:
    server, _ = herald
    user = User(server, app)
    phone = user.android(stand.fcm)
    live = user.subscribe("live", None)
    set_prefs(user, {"mutedGroups": ["promo"]})
    token = server.token(app, user.id)
    async with open_stream("ws", server.base_url, live.id, token) as stream:
        await stream.ready()
        muted = notify(user, groupName="promo")
        barrier = notify(user, groupName="orders")
        # The live stream gets both.
        got = [(await stream.next())["id"] for _ in range(2)]
        assert got == [muted["id"], barrier["id"]]
    # Stored and synced: GET and delta have both.
    listed = user.me.get("/beta/me/notifications").json()["value"]
    assert {n["id"] for n in listed} == {muted["id"], barrier["id"]}
    delta = user.me.get("/beta/me/notifications/delta").json()["value"]
    assert {n["id"] for n in delta} == {muted["id"], barrier["id"]}
    # Pushed: only the barrier.
    arrived(phone, 1)
    assert [(m["type"], m["id"]) for m in sent(phone)] == [("alert", barrier["id"])]


async def test_a_muted_platform_gets_no_alert_while_another_does(
    herald: tuple[Server, Running], app: RegisteredApp, stand: Providers
) -> None:
    server, _ = herald
    user = User(server, app)
    iphone, android = user.ios(stand.apns), user.android(stand.fcm)
    set_prefs(user, {"mutedPlatforms": ["ios"]})  # platform names match as subscriptions do
    n = notify(user)
    arrived(android, 1)
    # The barrier for the iPhone: a silent sync of the same notification (read on the Android
    # device), which a muted platform still gets, so its state stays right.
    user.patch(n, {"readState": "read"}, android)
    arrived(iphone, 1)
    assert [(m["type"], m["id"]) for m in sent(iphone)] == [("sync", n["id"])]
    assert [(m["type"], m["id"]) for m in sent(android)] == [("alert", n["id"])]


# -- quiet hours ----------------------------------------------------------------------------------


async def test_quiet_hours_hold_alerts_and_send_one_summary_at_the_end(
    herald: tuple[Server, Running], app: RegisteredApp, stand: Providers
) -> None:
    """Two users in quiet hours: one lets High priority through, the other does not."""
    server, running = herald
    lets, holds = User(server, app), User(server, app)
    phone, other = lets.android(stand.fcm), holds.android(stand.fcm)
    browser = lets.webpush(stand.webpush)
    set_prefs(lets, {"quietHours": quiet_now(running.clock, allow_high=True)})
    set_prefs(holds, {"quietHours": quiet_now(running.clock, allow_high=False)})
    held = [notify(lets) for _ in range(3)]
    urgent = notify(lets, priority="High")
    notify(holds, priority="High")
    # High passes through for the user who chose so; it is the barrier: nothing else came.
    arrived(phone, 1)
    arrived(browser, 1)
    assert [(m["type"], m["id"]) for m in sent(phone)] == [("alert", urgent["id"])]
    assert [m["id"] for m in sent(browser)] == [urgent["id"]]
    # Still stored and listed meanwhile.
    listed = lets.me.get("/beta/me/notifications").json()["value"]
    assert {n["id"] for n in listed} == {n["id"] for n in [*held, urgent]}

    running.clock.advance(timedelta(hours=2))  # the quiet period ends
    arrived(phone, 2)
    arrived(browser, 2)
    arrived(other, 1)
    assert titles(phone)[1] == ("alert", "3 new notifications")
    assert titles(browser)[1] == ("alert", "3 new notifications")
    assert titles(other) == [("alert", "1 new notification")]  # its High one was held
    # One summary, not one per notification: the next alert is the next push.
    after = notify(lets)
    arrived(phone, 3)
    assert [m["id"] for m in pushed(phone)][2] == after["id"]
    assert len(pushed(phone)) == 3


async def test_held_pushes_survive_a_restart(
    herald: tuple[Server, Running], app: RegisteredApp, stand: Providers
) -> None:
    server, running = herald
    user = User(server, app)
    phone = user.android(stand.fcm)
    set_prefs(user, {"quietHours": quiet_now(running.clock, allow_high=False)})
    notify(user)
    notify(user)
    # Wait until both are dispatched (held) before stopping: the barrier is a second user's push.
    other = User(server, app)
    other_phone = other.android(stand.fcm)
    notify(other)
    arrived(other_phone, 1)
    running.stop()
    running.clock.advance(timedelta(hours=2))
    running.start()
    user.me.close()
    user.me = server.client(server.token(app, user.id))
    arrived(phone, 1)
    assert titles(phone) == [("alert", "2 new notifications")]


async def test_read_or_expired_held_notifications_are_not_summarised(
    herald: tuple[Server, Running], app: RegisteredApp, stand: Providers
) -> None:
    server, running = herald
    user = User(server, app)
    phone, tablet = user.android(stand.fcm), user.subscribe("live", None)
    set_prefs(user, {"quietHours": quiet_now(running.clock, allow_high=False)})
    read = notify(user)
    soon = (running.clock() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    notify(user, expirationDateTime=soon)  # expires before the period ends
    user.patch(read, {"readState": "read"}, tablet)
    arrived(phone, 1)  # the read one's sync: silent pushes are not held
    running.clock.advance(timedelta(hours=2))
    barrier = notify(user)  # after the period: alerts again
    arrived(phone, 2)
    assert [(m["type"], m["id"]) for m in sent(phone)] == [
        ("sync", read["id"]),
        ("alert", barrier["id"]),
    ]


# -- the resource ---------------------------------------------------------------------------------


async def test_the_resource_round_trips_with_etags(
    herald: tuple[Server, Running], app: RegisteredApp
) -> None:
    server, _ = herald
    user = User(server, app)
    r = user.me.get(PREFS)
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == 'W/"0"'
    body = r.json()
    assert {k: body[k] for k in ("mutedGroups", "mutedPlatforms", "quietHours")} == {
        "mutedGroups": [],
        "mutedPlatforms": [],
        "quietHours": None,
    }
    quiet = {
        "timeZone": "Europe/Berlin",
        "startTime": "22:30",
        "endTime": "07:00:00",
        "daysOfWeek": ["Friday", "saturday"],
        "allowHighPriority": True,
    }
    r = user.me.patch(
        PREFS,
        json={"mutedGroups": ["a", "b", "a"], "quietHours": quiet},
        headers={"If-Match": '"0"'},
    )
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == 'W/"1"'
    assert r.json()["quietHours"] == {
        "timeZone": "Europe/Berlin",
        "startTime": "22:30:00",
        "endTime": "07:00:00",
        "daysOfWeek": ["friday", "saturday"],
        "allowHighPriority": True,
    }
    assert r.json()["mutedGroups"] == ["a", "b"]
    # A PATCH keeps what it does not name; the app server sees the same through /users/{id}.
    r = user.me.patch(PREFS, json={"mutedPlatforms": ["webPush", "iOS"]})
    assert r.status_code == 200, r.text
    seen = user.backend.get(f"/beta/users/{user.id}/notificationPreferences")
    assert seen.status_code == 200, seen.text
    assert seen.headers["ETag"] == 'W/"2"'
    assert seen.json()["mutedGroups"] == ["a", "b"]
    assert seen.json()["mutedPlatforms"] == ["webPush", "iOS"]
    stale = user.me.patch(PREFS, json={"mutedGroups": []}, headers={"If-Match": 'W/"1"'})
    assert_graph_error(stale, 412, "preconditionFailed")
    # Another user's preferences are not a delegated token's to read.
    other = user.me.get("/beta/users/someone-else/notificationPreferences")
    assert_graph_error(other, 403, "accessDenied")
    assert user.me.get(PREFS).json()["mutedGroups"] == ["a", "b"]
    # Described in /openapi.json, with the platform names it takes.
    doc = user.me.get("/openapi.json").json()
    assert {"get", "patch"} <= set(doc["paths"]["/beta/me/notificationPreferences"])
    assert {"get", "patch"} <= set(doc["paths"]["/beta/users/{user}/notificationPreferences"])
    schema = doc["components"]["schemas"]["NotificationPreferences"]["properties"]
    assert set(schema["mutedPlatforms"]["items"]["enum"]) == {
        "iOS",
        "android",
        "webPush",
        "windows",
    }


BAD: list[tuple[Any, str]] = [
    ({"mutedPlatforms": ["blackberry"]}, "mutedPlatforms"),
    ({"mutedPlatforms": ["live"]}, "mutedPlatforms"),
    ({"mutedPlatforms": "iOS"}, "mutedPlatforms"),
    ({"mutedGroups": [f"g{i}" for i in range(101)]}, "mutedGroups"),
    ({"mutedGroups": [""]}, "mutedGroups"),
    ({"mutedGroups": [7]}, "mutedGroups"),
    ({"mutedGroups": ["x" * 257]}, "mutedGroups"),
    (
        {"quietHours": {"timeZone": "Mars/Olympus", "startTime": "22:00", "endTime": "07:00"}},
        "quietHours/timeZone",
    ),
    (
        {"quietHours": {"timeZone": "../etc/passwd", "startTime": "22:00", "endTime": "07:00"}},
        "quietHours/timeZone",
    ),
    (
        {"quietHours": {"timeZone": "UTC", "startTime": "24:00", "endTime": "07:00"}},
        "quietHours/startTime",
    ),
    (
        {"quietHours": {"timeZone": "UTC", "startTime": "22:00", "endTime": "7pm"}},
        "quietHours/endTime",
    ),
    (
        {"quietHours": {"timeZone": "UTC", "startTime": "22:00", "endTime": "22:00"}},
        "quietHours/endTime",
    ),
    ({"quietHours": {"startTime": "22:00", "endTime": "07:00"}}, "quietHours/timeZone"),
    (
        {
            "quietHours": {
                "timeZone": "UTC",
                "startTime": "22:00",
                "endTime": "07:00",
                "daysOfWeek": ["funday"],
            }
        },
        "quietHours/daysOfWeek",
    ),
    (
        {
            "quietHours": {
                "timeZone": "UTC",
                "startTime": "22:00",
                "endTime": "07:00",
                "daysOfWeek": [],
            }
        },
        "quietHours/daysOfWeek",
    ),
    (
        {
            "quietHours": {
                "timeZone": "UTC",
                "startTime": "22:00",
                "endTime": "07:00",
                "allowHighPriority": "yes",
            }
        },
        "quietHours/allowHighPriority",
    ),
    (
        {"quietHours": {"timeZone": "UTC", "startTime": "22:00", "endTime": "07:00", "volume": 3}},
        "quietHours/volume",
    ),
    ({"quietHours": "22-07"}, "quietHours"),
    ({"lastModifiedDateTime": "2020-01-01T00:00:00Z"}, "lastModifiedDateTime"),
]


async def test_bad_input_is_refused_and_changes_nothing(
    herald: tuple[Server, Running], app: RegisteredApp
) -> None:
    server, running = herald
    user = User(server, app)
    set_prefs(user, {"mutedGroups": ["kept"], "quietHours": quiet_now(running.clock, True)})
    before = user.me.get(PREFS)
    for body, target in BAD:
        r = user.me.patch(PREFS, json=body)
        assert_graph_error(r, 400, "invalidRequest", target)
    r = user.me.patch(PREFS, json={"mutedGroup": ["typo"]})
    assert_graph_error(r, 400, "invalidRequest")
    r = user.me.patch(PREFS, content=b"{", headers={"Content-Type": "application/json"})
    assert_graph_error(r, 400, "invalidRequest", "body")
    after = user.me.get(PREFS)
    assert after.headers["ETag"] == before.headers["ETag"] == 'W/"1"'
    assert after.json() == before.json()
