"""Push delivery when things go wrong (docs/push.md, "Delivery engine"): providers answering
429/503 with Retry-After, timing out, going away mid-burst; Herald restarted (cleanly and with
SIGKILL) with retries pending; notifications expiring while the provider fails; refused and
missing credentials; a slow provider beside a healthy one; and the iOS fallback.

One Herald on SQLite serves the module (push_concurrency 2, so a stuck provider fills its lane);
the restart tests run `herald serve` as a subprocess, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from herald.auth.issuer import LocalIssuer
from herald.model import Provider
from herald.store import open_store
from tests.clock import Clock as MovedClock
from tests.conftest import RegisteredApp, Server, free_port, make_settings, serve, servers
from tests.devices import open_stream
from tests.processes import register, start
from tests.pushes import (
    SUBS,
    Device,
    Providers,
    User,
    arrived,
    configure_app,
    expires_in,
    message,
    messages,
    metrics,
    providers,
    sample,
    set_apns,
    set_fcm,
    set_wns,
    stop_providers,
    unix,
    wait_for,
)
from tests.standins import TlsFiles, make_tls
from tests.standins.webpush import WebPushStandIn

CONCURRENCY = 2
DELAY = 6.0  # a provider's answer that comes too late: push_timeout is 2 s


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("push-faults-tls"))


@pytest.fixture(scope="module")
def stand(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Providers]:
    """The stand-ins; Web Push on a fixed port, so it can be stopped and started again there."""
    directory = tmp_path_factory.mktemp("push-faults-credentials")
    running = providers(tls, directory, ports={"webpush": free_port()})
    try:
        yield running
    finally:
        stop_providers(running)


@pytest.fixture(scope="module")
def server(stand: Providers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("herald-push-faults")
    # Retry-After is honoured up to push_backoff_max: 5 s, so a Retry-After: 2 is observable.
    settings = stand.settings(
        push_concurrency=CONCURRENCY, push_max_attempts=20, push_backoff_max=5.0
    )
    yield from servers("sqlite", data, **settings)


@pytest.fixture
def app(server: Server, stand: Providers) -> Iterator[RegisteredApp]:
    yield configure_app(server, stand)
    server.close_clients()


@pytest.fixture
def alice(server: Server, app: RegisteredApp) -> User:
    return User(server, app)


@pytest.fixture(scope="module")
def clock() -> MovedClock:
    return MovedClock()


@pytest.fixture(scope="module")
def clocked(
    stand: Providers, clock: MovedClock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A Herald on the test's clock, for what falls due later (an iOS fallback)."""
    data = tmp_path_factory.mktemp("herald-push-faults-clocked")
    yield from serve(make_settings(data, **stand.settings()), clock)


# -- provider answers ---------------------------------------------------------------------------


def test_retry_after_is_honoured_then_delivered_once(alice: User, stand: Providers) -> None:
    """Each provider answers 429 and then 503, both with Retry-After: 2; the retries come no
    earlier than 2 s after each refusal, and the push is delivered exactly once."""
    devices = [
        alice.webpush(stand.webpush),
        alice.ios(stand.apns),
        alice.android(stand.fcm),
        alice.windows(stand.wns),
    ]
    for device in devices:
        assert device.standin is not None
        for status in (429, 503):
            device.standin.fault(status, 1, headers={"Retry-After": "2"}, target=device.target)
    n = alice.notify()
    for device in devices:
        assert device.standin is not None
        [delivered] = arrived(device, 1)
        assert delivered.message["id"] == n["id"]
        first, second = device.standin.refused(device.target)
        assert (first.status, second.status) == (429, 503), device.platform
        assert second.at - first.at >= 1.95, (device.platform, second.at - first.at)
        assert delivered.at - second.at >= 1.95, (device.platform, delivered.at - second.at)
        alice.wait_state(device, lambda s: s["consecutiveFailures"] == 0, "delivered")
    again = alice.notify()
    for device in devices:
        arrived(device, 2)
        assert [m["id"] for m in messages(device)] == [n["id"], again["id"]], device.platform


def test_retry_after_one_second_is_sent_after_one_second(alice: User, stand: Providers) -> None:
    """A 429 and then a 503, each with Retry-After: 1: each retry goes out about 1 s after the
    refusal, not at the queue's next once-a-second look for due work (2 s)."""
    devices = [
        alice.webpush(stand.webpush),
        alice.ios(stand.apns),
        alice.android(stand.fcm),
        alice.windows(stand.wns),
    ]
    for device in devices:
        assert device.standin is not None
        for status in (429, 503):
            device.standin.fault(status, 1, headers={"Retry-After": "1"}, target=device.target)
    n = alice.notify()
    for device in devices:
        assert device.standin is not None
        [delivered] = arrived(device, 1)
        assert delivered.message["id"] == n["id"]
        first, second = device.standin.refused(device.target)
        for gap in (second.at - first.at, delivered.at - second.at):
            assert 0.95 <= gap < 1.5, (device.platform, gap)


def test_a_push_services_cookie_is_never_kept_nor_sent_back(alice: User, stand: Providers) -> None:
    """A Web Push endpoint is the device's choice, so its answers are a stranger's: a
    Set-Cookie in one (here a 429's) must leave Herald no state. Nothing goes back with the
    retry, nor with pushes to another subscription on the same host (a cookie would tie one
    user's pushes to another's for the service, and a hostile endpoint setting new cookies on
    every answer would grow Herald's memory without bound)."""
    # On a host name: a cookie jar (aiohttp's, used before) keeps none from an IP address.
    service = WebPushStandIn(stand.tls, host="localhost")
    service.start()
    try:
        devices = [alice.webpush(service) for _ in range(2)]
        first, second = devices
        cookie = {"Retry-After": "1", "Set-Cookie": "track=one-device; Path=/; Max-Age=3600"}
        service.fault(429, 1, headers=cookie, target=first.target)
        n = alice.notify()
        arrived(first, 1)
        arrived(second, 1)
        [refusal] = service.refused(first.target)
        assert refusal.status == 429, refusal
        again = alice.notify()
        for device in devices:
            delivered = arrived(device, 2)
            assert [d.message["id"] for d in delivered] == [n["id"], again["id"]]
            for d in delivered:
                assert "cookie" not in d.headers, (device is first, d.headers["cookie"])
    finally:
        service.stop()


def test_timeout_is_retried(alice: User, stand: Providers) -> None:
    """A provider answering later than push_timeout (2 s): the attempt is abandoned, retried,
    and delivered. Over HTTP/1.1 (Web Push) the stand-in sees the client go away and processes
    nothing: delivered exactly once. Over HTTP/2 (APNs) httpx abandons the stream without
    resetting it, so the service (the real one too) still processes the first request when its
    delay is over: delivered at least once, the retry first."""
    browser = alice.webpush(stand.webpush)
    phone = alice.ios(stand.apns)
    for device in (browser, phone):
        assert device.standin is not None
        device.standin.delay(DELAY, target=device.target, count=1)
    posted = time.time()
    n = alice.notify()

    [delivered] = arrived(browser, 1)
    assert delivered.message["id"] == n["id"]
    [gave_up] = stand.webpush.refused(browser.target)
    assert (gave_up.status, gave_up.reason) == (0, "ClientGone"), gave_up
    assert delivered.at >= gave_up.at

    retried = arrived(phone, 1)[0]
    assert retried.message["id"] == n["id"]
    assert retried.at - posted < DELAY  # the retry, not the delayed first request
    wait_for(lambda: time.time() > posted + DELAY + 0.5, "the delayed request to end", 10)

    again = alice.notify()
    arrived(browser, 2)
    assert [m["id"] for m in messages(browser)] == [n["id"], again["id"]]
    wait_for(lambda: again["id"] in [m["id"] for m in messages(phone)], "the phone's barrier")
    ids = [m["id"] for m in messages(phone)]
    assert ids[-1] == again["id"] and set(ids[:-1]) == {n["id"]} and len(ids) <= 3, ids
    for device in (browser, phone):
        alice.wait_state(device, lambda s: s["consecutiveFailures"] == 0, "delivered")


def test_provider_restarting_mid_burst_loses_nothing(
    alice: User, stand: Providers, record_property: Any
) -> None:
    """50 notifications; the Web Push service stops after the 20th and comes back on the same
    port after the 35th: every one arrives (at least once)."""
    device = alice.webpush(stand.webpush)
    ids = []
    try:
        for i in range(50):
            if i == 20:
                stand.webpush.stop()
            ids.append(alice.notify(appNotificationId=f"burst-{i}")["id"])
            if i == 35:
                stand.webpush.start()
    finally:
        if stand.webpush._thread is None:  # a failure before the restart
            stand.webpush.start()

    def received() -> list[str]:
        return [m["id"] for m in messages(device)]

    wait_for(lambda: set(ids) <= set(received()), "all 50 notifications")
    got = received()
    assert set(got) == set(ids)
    duplicates = len(got) - len(set(got))
    record_property("duplicates", duplicates)
    print(f"provider restart mid-burst: {len(got)} pushes for 50 notifications, {duplicates} dup")
    assert duplicates <= 50


# -- durability ---------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes], how: str) -> None:
    if how == "sigkill":
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
    else:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) in (0, -signal.SIGTERM)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_pending_retries_survive_a_restart(
    stand: Providers, tmp_path: Path, store_url: str | None, how: str
) -> None:
    """A push the provider keeps refusing (503) waits in the store: Herald stops (cleanly, or
    killed), starts again on the same data and store, and delivers it once the provider
    recovers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    host = f"restart-{uuid.uuid4().hex[:8]}.example.com"
    client_id = register(tmp_path, store_url, host)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    user = f"user-{uuid.uuid4()}"
    env = stand.env(push_lease=3.0)
    proc = start(tmp_path, port, store_url, **env)
    try:
        with (
            httpx.Client(base_url=base, timeout=10, trust_env=False) as http,
        ):
            me = {"Authorization": f"Bearer {issuer.mint(client_id=client_id, user_id=user)}"}
            backend = {"Authorization": f"Bearer {issuer.mint(client_id=client_id, user_id=None)}"}
            key = http.get("/beta/webPushKey", headers=me).json()["applicationServerKey"]
            channel = stand.webpush.subscribe(key)
            target = stand.webpush.target_of(channel["endpoint"])
            body = {"application": host, "platform": "webPush", "pushChannel": channel}
            r = http.post(SUBS, json=body, headers=me)
            assert r.status_code == 201, r.text
            sub = r.json()["id"]
            stand.webpush.fault(503, None, target=target)
            n = http.post(
                f"/beta/users/{user}/notifications",
                json={"targetHostName": host, "payload": {"rawContent": "after the restart"}},
                headers=backend,
            )
            assert n.status_code == 201, n.text
            wait_for(lambda: len(stand.webpush.refused(target)) >= 2, "two refused attempts")
            _stop(proc, how)
            refused = len(stand.webpush.refused(target))
            assert stand.webpush.accepted(target) == []
            restarted = time.time()
            proc = start(tmp_path, port, store_url, **env)
            stand.webpush.clear_faults()
            [d] = stand.webpush.wait_accepted(1, 30, target=target)
            assert d.message["id"] == n.json()["id"]
            assert d.message["rawContent"] == "after the restart"
            assert d.at > restarted
            assert len(stand.webpush.refused(target)) >= refused

            def state() -> dict[str, Any] | None:
                got = http.get(f"{SUBS}/{sub}", headers=me).json()["deliveryState"]
                return got if got["lastDeliveredDateTime"] is not None else None

            delivered = wait_for(state, "the delivery recorded")
            assert delivered["consecutiveFailures"] == 0 and delivered["lastError"] is None
    finally:
        stand.webpush.clear_faults()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# -- expiry -------------------------------------------------------------------------------------


async def _queued(store_url: str, provider: Provider) -> int:
    store = open_store(store_url)
    await store.open()
    try:
        return await store.count_deliveries(provider)
    finally:
        await store.close()


def test_expired_push_is_dropped_not_sent(server: Server, alice: User, stand: Providers) -> None:
    """The provider fails until the notification has expired: it is never delivered after that,
    the delivery is dropped (a retry that would land past the expiration is not queued: the
    subscription's lastError says so), and the queue empties."""
    later = alice.android(stand.fcm)  # 503, Retry-After beyond the expiration
    failing = alice.android(stand.fcm)  # 503 without Retry-After: short retries until expiry
    stand.fcm.fault(503, None, headers={"Retry-After": "30"}, target=later.target)
    stand.fcm.fault(503, None, target=failing.target)
    expiry = expires_in(4)
    n = alice.notify(expirationDateTime=expiry, payload={"rawContent": "short-lived"})
    state = alice.wait_state(later, lambda s: s["lastError"] is not None, "dropped")
    assert state["lastError"].startswith("expired before delivery: HTTP 503"), state
    assert state["consecutiveFailures"] == 1
    wait_for(lambda: time.time() > unix(expiry) + 1.5, "the expiration", timeout=10)
    failed = alice.state(failing)
    assert failed["consecutiveFailures"] >= 2 and "HTTP 503" in failed["lastError"], failed
    assert failed["lastDeliveredDateTime"] is None
    wait_for(
        lambda: asyncio.run(_queued(server.settings.resolved_store_url, Provider.FCM)) == 0,
        "the FCM queue to empty",
    )
    stand.fcm.clear_faults()
    barrier = alice.notify()
    for device in (later, failing):
        arrived(device, 1)
        assert [m["id"] for m in messages(device)] == [barrier["id"]]  # never n
    assert n["id"] != barrier["id"]
    wait_for(  # the barrier is settled just after the stand-in accepted it
        lambda: asyncio.run(_queued(server.settings.resolved_store_url, Provider.FCM)) == 0,
        "the FCM queue to empty again",
    )


# -- credentials --------------------------------------------------------------------------------


def _unknown_apns_key(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / "AuthKey_UNKNOWN123.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.mark.parametrize("case", ["apns-unknown-key", "fcm-missing", "wns-wrong-secret"])
def test_refused_credentials_are_reported_and_retried_until_fixed(
    server: Server,
    stand: Providers,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="herald.push")
    app = server.register()
    user = User(server, app)
    provider = case.split("-")[0]
    device: Device
    if case == "apns-unknown-key":
        key = _unknown_apns_key(tmp_path)
        set_apns(server, app, stand.apns, tmp_path, key_file=key, key_id="UNKNOWN123")
        device = user.ios(stand.apns)
        error = "HTTP 403: InvalidProviderToken"
    elif case == "fcm-missing":
        device = user.android(stand.fcm)
        error = f"no FCM credentials for {app.host_name}"
    else:
        set_wns(server, app, stand.wns, secret="not-the-secret")
        device = user.windows(stand.wns)
        error = "WNS token endpoint: HTTP 400 invalid_client"
    before = sample(metrics(server), "herald_push_credential_failures_total", provider=provider)
    n = user.notify()
    state = user.wait_state(device, lambda s: s["consecutiveFailures"] >= 2, "retried")
    assert state["lastError"] == error, state
    assert state["goneDateTime"] is None
    if case == "apns-unknown-key":
        assert {r.reason for r in stand.apns.refused(device.target)} == {"InvalidProviderToken"}
    failures = sample(metrics(server), "herald_push_credential_failures_total", provider=provider)
    assert failures - before >= 2
    logged = [
        r
        for r in caplog.records
        if r.name == "herald.push"
        and r.levelno == logging.ERROR
        and getattr(r, "app", None) == app.host_name
    ]
    assert logged, caplog.records
    assert {getattr(r, "provider", None) for r in logged} == {provider}
    assert "credentials" in logged[0].getMessage()

    # Fixed with the CLI: delivered, once.
    if provider == "apns":
        set_apns(server, app, stand.apns, stand.credentials)
    elif provider == "fcm":
        set_fcm(server, app, stand.fcm, stand.credentials)
    else:
        set_wns(server, app, stand.wns)
    [d] = arrived(device, 1)
    assert d.message["id"] == n["id"]
    user.wait_state(device, lambda s: s["consecutiveFailures"] == 0, "delivered")
    barrier = user.notify()
    arrived(device, 2)
    assert [m["id"] for m in messages(device)] == [n["id"], barrier["id"]]
    server.close_clients()


# -- isolation ----------------------------------------------------------------------------------


def test_slow_provider_does_not_stall_others(alice: User, stand: Providers) -> None:
    """WNS answers nobody for 30 s (each attempt times out after 2 s, and the lane holds only
    two at a time); the user's Web Push device gets all ten notifications meanwhile."""
    pc = alice.windows(stand.wns)
    browser = alice.webpush(stand.webpush)
    stand.wns.delay(30.0, target=pc.target)
    try:
        ids = [alice.notify(appNotificationId=f"slow-{i}")["id"] for i in range(10)]
        arrived(browser, 10)
        assert [m["id"] for m in messages(browser)] == ids  # in change order, once each
        assert stand.wns.accepted(pc.target) == []  # still stuck
    finally:
        stand.wns.delay(0, target=pc.target)

    def pc_ids() -> set[str]:
        return {m["id"] for m in messages(pc)}

    wait_for(lambda: pc_ids() == set(ids), "WNS to catch up", timeout=30)
    assert all(r.status == 0 for r in stand.wns.refused(pc.target))  # only timeouts


# -- iOS fallback -------------------------------------------------------------------------------


class Watch(threading.Thread):
    """A device's live stream (SSE) in a thread of its own, open until stopped."""

    def __init__(self, base: str, subscription: str, token: str) -> None:
        super().__init__(daemon=True)
        self.base, self.subscription, self.token = base, subscription, token
        self.opened = threading.Event()
        self.done = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self.watch())
        except BaseException as exc:
            self.error = exc
        finally:
            self.opened.set()

    async def watch(self) -> None:
        async with open_stream("sse", self.base, self.subscription, self.token) as stream:
            await stream.ready()
            self.opened.set()
            while not self.done.is_set() and stream.end is None:
                try:
                    self.received.append(await stream.next(wait=0.5))
                except AssertionError:
                    if stream.end is not None:
                        raise
                    continue


def test_ios_fallback_goes_only_to_devices_that_did_not_fetch(
    clocked: Server, clock: MovedClock, stand: Providers
) -> None:
    """A raw notification with a fallback policy goes to three iOS devices as a background push.
    A fetches it with delta (X-UNS-ID), C receives it over its live stream, B does nothing:
    after fallbackDelayInSeconds (60, the minimum; Herald's clock is moved on) only B gets the
    fallback alert."""
    server = clocked
    alice = User(server, configure_app(server, stand))
    a, b, c = alice.ios(stand.apns), alice.ios(stand.apns), alice.ios(stand.apns)
    watch = Watch(server.base_url, c.id, server.token(alice.app, alice.id))
    watch.start()
    try:
        assert watch.opened.wait(10) and watch.error is None, watch.error
        fallback = {"title": "You have a new message", "body": "Open the app to read it"}
        posted = clock()
        n = alice.notify(
            payload={"rawContent": "secret"},
            fallbackPolicy={
                "endpointFallback": {
                    "platformTypes": ["iOS"],
                    "fallbackDelayInSeconds": 60,
                    "visualContent": fallback,
                }
            },
        )
        position = alice.head()
        for device in (a, b, c):
            [d] = arrived(device, 1)
            assert d.kind == "background"
            assert d.payload["herald"] == message(n, "alert", position)
        delta = alice.me.get("/beta/me/notifications/delta", headers={"X-UNS-ID": a.id})
        assert delta.status_code == 200, delta.text
        assert n["id"] in {item["id"] for item in delta.json()["value"]}
        wait_for(lambda: any(m.get("id") == n["id"] for m in watch.received), "C's stream")
        time.sleep(2)  # lanes wake at least once a second: nothing is due before the delay
        assert len(stand.apns.accepted(b.target)) == 1

        clock.advance(posted + timedelta(seconds=55) - clock())
        time.sleep(2)
        assert len(stand.apns.accepted(b.target)) == 1  # still a few seconds early
        clock.advance(timedelta(seconds=5))
        late = stand.apns.wait_accepted(2, 10, target=b.target)[1]
        assert late.kind == "alert"
        assert late.headers["apns-push-type"] == "alert"
        assert late.headers["apns-priority"] == "10"
        assert late.headers["apns-collapse-id"] == n["id"]
        with_fallback = {**n, "payload": {"visualContent": fallback}}
        assert late.payload == {
            "aps": {"alert": fallback, "sound": "default"},
            "herald": message(with_fallback, "fallback", position),
        }
        barrier = alice.notify(payload={"visualContent": {"title": "barrier"}})
        for device in (a, c):
            arrived(device, 2)
            assert [m["id"] for m in messages(device)] == [n["id"], barrier["id"]]
            assert [m["type"] for m in messages(device)] == ["alert", "alert"]
        arrived(b, 3)
    finally:
        watch.done.set()
        watch.join(10)
    assert watch.error is None, watch.error
