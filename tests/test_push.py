"""Push channels end to end (docs/push.md): a real Herald (SQLite, then PostgreSQL) sends over real
HTTPS to the verifying stand-ins of Web Push, APNs (HTTP/2), FCM and WNS (tests/standins), which
decrypt, verify and record every push. Each test asserts the exact messages and headers the
stand-ins accepted, and the subscriptions' deliveryState, against the contract (the expected
messages are computed in tests/pushes.py, not with Herald's own code).

Negative checks ("nothing was sent to X") use a barrier: a later notification that X does get.
Deliveries are claimed earliest-due first, so anything queued for X before the barrier would have
been sent no later than the barrier itself."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from herald.settings import Settings
from tests.conftest import RegisteredApp, Server, servers
from tests.devices import assert_graph_error, webpush_channel
from tests.pushes import (
    SUBS,
    Providers,
    User,
    apns_collapse_id,
    arrived,
    by_position,
    cli,
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
    strings,
    unix,
    wait_for,
    webpush_topic,
    wns_tag,
)
from tests.standins import TlsFiles, make_tls

NEVER = {
    "lastDeliveredDateTime": None,
    "consecutiveFailures": 0,
    "lastError": None,
    "goneDateTime": None,
}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("push-tls"))


@pytest.fixture(scope="module")
def stand(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Providers]:
    """The five stand-ins, shared by the SQLite and the PostgreSQL server (every test makes its
    own targets, so their records do not mix)."""
    running = providers(tls, tmp_path_factory.mktemp("push-credentials"))
    try:
        yield running
    finally:
        stop_providers(running)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, stand: Providers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # Retry-After is honoured up to push_backoff_max: 3 s, so a Retry-After: 2 keeps a retry
    # waiting long enough to be observed.
    settings = stand.settings(push_backoff_max=3.0)
    yield from servers(request.param, tmp_path_factory.mktemp("herald-push"), **settings)


@pytest.fixture
def app(server: Server, stand: Providers) -> Iterator[RegisteredApp]:
    """A new app with APNs, FCM and WNS credentials (set with the CLI before its first push)."""
    yield configure_app(server, stand)
    server.close_clients()


@pytest.fixture
def alice(server: Server, app: RegisteredApp) -> User:
    return User(server, app)


# -- Web Push -----------------------------------------------------------------------------------


def test_webpush_key_is_the_cli_key(server: Server, alice: User) -> None:
    by_api = alice.me.get("/beta/webPushKey")
    assert by_api.status_code == 200, by_api.text
    by_cli = cli(server, "app", "push-key", alice.app.host_name).output.strip()
    assert by_api.json() == {"application": alice.app.host_name, "applicationServerKey": by_cli}
    # Any token of the app will do, and the key is stable.
    assert alice.backend.get("/beta/webPushKey").json() == by_api.json()
    assert cli(server, "app", "push-key", alice.app.client_id).output.strip() == by_cli
    assert server.client().get("/beta/webPushKey").status_code == 401


def test_webpush_alert_is_the_documented_message(alice: User, stand: Providers) -> None:
    key = alice.me.get("/beta/webPushKey").json()["applicationServerKey"]
    device = alice.webpush(stand.webpush)
    assert alice.subscription(device)["deliveryState"] == NEVER
    before = datetime.now(UTC)
    n = alice.notify(
        groupName="orders",
        displayTimeToLive=120,
        expirationDateTime=expires_in(3600),
        payload={
            "visualContent": {"title": "Your order shipped", "body": "Grüße <&> 日本"},
            "rawContent": '{"order": 17}',
        },
    )
    position = alice.head()
    [d] = arrived(device, 1)
    assert d.message == message(n, "alert", position)
    assert d.message["priority"] == "High" and d.message["groupName"] == "orders"
    assert d.message["displayTimeToLive"] == 120
    assert d.details["urgency"] == "high"
    assert d.details["topic"] == webpush_topic(n["id"])
    assert 3590 <= d.details["ttl"] <= 3600, d.details
    assert d.details["vapid_key"] == key  # signed with the app's own VAPID key
    assert d.details["vapid_sub"] == alice.server.settings.push_vapid_subject
    assert d.headers["content-encoding"] == "aes128gcm"
    assert d.headers["content-type"] == "application/octet-stream"

    # Delivery state on success.
    state = alice.wait_state(device, lambda s: s["lastDeliveredDateTime"] is not None, "delivered")
    delivered = datetime.fromisoformat(state["lastDeliveredDateTime"].replace("Z", "+00:00"))
    assert before <= delivered <= datetime.now(UTC)
    assert state == {**NEVER, "lastDeliveredDateTime": state["lastDeliveredDateTime"]}

    # Urgency follows the priority: None → normal (raw only), Low → low.
    raw = alice.notify(payload={"rawContent": "sync please"})
    assert raw["priority"] == "None"
    arrived(device, 2)
    raw_position = alice.head()
    low = alice.notify(
        priority="Low", payload={"visualContent": {"title": "FYI"}}, expirationDateTime=None
    )
    low_position = alice.head()
    got = arrived(device, 3)
    assert got[1].message == message(raw, "alert", raw_position)
    assert got[1].details["urgency"] == "normal"
    assert got[2].message == message(low, "alert", low_position)
    assert got[2].details["urgency"] == "low"
    # The default expiration (7 days) is the TTL.
    assert 7 * 86400 - 10 <= got[2].details["ttl"] <= 7 * 86400


def test_webpush_replace_alerts_again_under_the_same_topic(alice: User, stand: Providers) -> None:
    device = alice.webpush(stand.webpush)
    first = alice.notify(appNotificationId="order-17")
    first_position = alice.head()
    arrived(device, 1)
    second = alice.notify(
        status=200,
        appNotificationId="order-17",
        payload={"visualContent": {"title": "Order 17 delivered", "body": "at the door"}},
        priority="Low",
    )
    assert second["id"] == first["id"]
    second_position = alice.head()
    a, b = arrived(device, 2)
    assert a.message == message(first, "alert", first_position)
    assert b.message == message(second, "alert", second_position)
    assert b.message["title"] == "Order 17 delivered"
    assert a.details["topic"] == b.details["topic"] == webpush_topic(first["id"])
    assert (a.details["urgency"], b.details["urgency"]) == ("high", "low")


def test_webpush_gets_no_state_changes_or_removals(alice: User, stand: Providers) -> None:
    browser = alice.webpush(stand.webpush)
    phone = alice.ios(stand.apns)  # a witness: it gets the sync and the removal
    n = alice.notify()
    arrived(browser, 1)
    arrived(phone, 1)
    r = alice.me.patch(f"/beta/me/notifications/{n['id']}", json={"readState": "read"})
    assert r.status_code == 200, r.text
    alice.delete(n)
    # The phone is told (the sync may be superseded by the removal if still queued).
    wait_for(lambda: "remove" in [m["type"] for m in messages(phone)], "the phone's removal")
    assert [m["type"] for m in messages(phone)] in (
        ["alert", "sync", "remove"],
        ["alert", "remove"],
    )
    barrier = alice.notify()
    arrived(browser, 2)
    assert [m["id"] for m in messages(browser)] == [n["id"], barrier["id"]]
    assert [m["type"] for m in messages(browser)] == ["alert", "alert"]


def test_webpush_too_large_message_is_a_shoulder_tap(alice: User, stand: Providers) -> None:
    """4,096 bytes of payload fit the API but not an encrypted Web Push message with its
    metadata: the content is dropped and "truncated" set; a visual alert keeps its title and
    body if only rawContent had to go."""
    device = alice.webpush(stand.webpush)
    raw = alice.notify(payload={"rawContent": "r" * 3950})
    raw_position = alice.head()
    [d] = arrived(device, 1)
    assert d.message == message(raw, "alert", raw_position, content=False, truncated=True)
    assert d.details["encrypted_size"] <= 4096

    both = alice.notify(
        payload={"visualContent": {"title": "Big", "body": "news"}, "rawContent": "r" * 3900}
    )
    both_position = alice.head()
    d = arrived(device, 2)[1]
    expected = message(both, "alert", both_position, truncated=True)
    del expected["rawContent"]
    assert d.message == expected
    assert d.message["title"] == "Big" and d.message["body"] == "news"


# -- APNs ---------------------------------------------------------------------------------------


def test_apns_alert_background_sync_and_remove(alice: User, stand: Providers) -> None:
    a, b = alice.ios(stand.apns), alice.ios(stand.apns)
    expiry = expires_in(1800)
    n = alice.notify(
        groupName="orders",
        expirationDateTime=expiry,
        payload={"visualContent": {"title": "Your order shipped", "body": "Track it"}},
    )
    n_position = alice.head()
    for device in (a, b):
        [d] = arrived(device, 1)
        assert d.kind == "alert" and d.http_version == "2"
        assert d.headers["apns-push-type"] == "alert"
        assert d.headers["apns-priority"] == "10"
        assert d.headers["apns-collapse-id"] == apns_collapse_id(n["id"]) == n["id"]
        assert d.headers["apns-expiration"] == str(unix(expiry))
        assert d.headers["apns-topic"] == stand.apns.topic
        assert d.payload == {
            "aps": {
                "alert": {"title": "Your order shipped", "body": "Track it"},
                "sound": "default",
                "thread-id": "orders",
            },
            "herald": message(n, "alert", n_position),
        }

    raw = alice.notify(payload={"rawContent": "new data"})
    raw_position = alice.head()
    low = alice.notify(priority="Low", payload={"visualContent": {"title": "FYI"}})
    low_position = alice.head()
    for device in (a, b):
        _, r, lo = by_position(arrived(device, 3))
        assert r.kind == "background"
        assert r.headers["apns-push-type"] == "background"
        assert r.headers["apns-priority"] == "5"
        assert r.headers["apns-collapse-id"] == raw["id"]
        assert r.payload == {
            "aps": {"content-available": 1},
            "herald": message(raw, "alert", raw_position),
        }
        assert lo.headers["apns-push-type"] == "alert"
        assert lo.headers["apns-priority"] == "5"  # a Low alert
        assert lo.payload["herald"] == message(low, "alert", low_position)

    # Device A reads the notification: B is told (background sync), A is not.
    read = alice.me.patch(
        f"/beta/me/notifications/{n['id']}", json={"readState": "read"}, headers={"X-UNS-ID": a.id}
    )
    assert read.status_code == 200, read.text
    read_position = alice.head()
    d = arrived(b, 4)[3]
    assert d.headers["apns-push-type"] == "background"
    assert d.headers["apns-priority"] == "5"
    assert d.headers["apns-collapse-id"] == n["id"]
    assert d.payload == {
        "aps": {"content-available": 1},
        "herald": message(read.json(), "sync", read_position),
    }
    assert d.payload["herald"]["readState"] == "read"

    # Device A deletes it: B gets a background removal.
    alice.delete(n, a)
    removed_at = time.time()
    remove_position = alice.head()
    d = arrived(b, 5)[4]
    assert d.headers["apns-push-type"] == "background"
    assert d.headers["apns-priority"] == "5"
    assert d.headers["apns-collapse-id"] == n["id"]
    assert d.payload == {
        "aps": {"content-available": 1},
        "herald": {"type": "remove", "position": remove_position, "id": n["id"]},
    }
    assert abs(int(d.headers["apns-expiration"]) - (removed_at + 86400)) < 30  # a day to try

    barrier = alice.notify(payload={"visualContent": {"title": "barrier"}})
    arrived(a, 4)
    arrived(b, 6)
    assert [m["id"] for m in messages(a)] == [n["id"], raw["id"], low["id"], barrier["id"]]
    assert [m["type"] for m in messages(a)] == ["alert"] * 4
    assert [(m["type"], m["id"]) for m in messages(b)] == [
        ("alert", n["id"]),
        ("alert", raw["id"]),
        ("alert", low["id"]),
        ("sync", n["id"]),
        ("remove", n["id"]),
        ("alert", barrier["id"]),
    ]


def test_apns_development_environment_uses_the_development_url(
    server: Server, stand: Providers
) -> None:
    app = server.register()
    set_apns(server, app, stand.apns_dev, stand.credentials, environment="development")
    shown = json.loads(cli(server, "app", "push-show", app.host_name).output)
    assert shown["apns"]["environment"] == "development"
    user = User(server, app)
    device = user.ios(stand.apns_dev)
    n = user.notify()
    [d] = arrived(device, 1)
    assert d.message == message(n, "alert", user.head())
    # The production stand-in never heard of it.
    assert stand.apns.accepted(device.target) == [] and stand.apns.refused(device.target) == []
    server.close_clients()


# -- FCM ----------------------------------------------------------------------------------------


def test_fcm_notification_and_data_messages_share_one_access_token(
    alice: User, stand: Providers
) -> None:
    issued = stand.fcm.stats().get("tokens_issued", 0)
    device = alice.android(stand.fcm)
    n = alice.notify(groupName="orders", displayTimeToLive=30)
    raw = alice.notify(payload={"rawContent": "data only"})
    low = alice.notify(
        priority="Low",
        payload={"visualContent": {"title": "FYI", "body": "low"}, "rawContent": "x"},
    )
    head = alice.head()  # the three were posted in turn: positions head-2, head-1, head
    got = {d.message["id"]: d for d in arrived(device, 3)}

    def check(d: Any, note: dict[str, Any], kind: str, visual: bool, priority: str) -> None:
        pos = head - [n, raw, low][::-1].index(note)
        assert d.kind == kind
        expected_android: dict[str, Any] = {
            "priority": priority,
            "ttl": d.payload["android"]["ttl"],
            "collapse_key": note["id"],
        }
        if visual:
            expected_android["notification"] = {"tag": note["id"]}
        expected: dict[str, Any] = {
            "token": device.target,
            "data": strings(message(note, "alert", pos)),
            "android": expected_android,
        }
        if visual:
            visual_content = note["payload"]["visualContent"]
            expected["notification"] = {
                k: visual_content[k] for k in ("title", "body") if visual_content.get(k)
            }
        assert d.payload == expected
        ttl = d.payload["android"]["ttl"]
        assert ttl.endswith("s") and 3590 <= int(ttl[:-1]) <= 3600, ttl
        assert all(isinstance(v, str) for v in d.message.values())

    check(got[n["id"]], n, "notification", True, "HIGH")
    assert got[n["id"]].message["displayTimeToLive"] == "30"
    check(got[raw["id"]], raw, "data", False, "NORMAL")
    check(got[low["id"]], low, "notification", True, "NORMAL")
    assert got[low["id"]].message["rawContent"] == "x"

    more = [alice.notify() for _ in range(3)]
    arrived(device, 6)
    assert {m["id"] for m in messages(device)} >= {m["id"] for m in more}
    assert stand.fcm.stats()["tokens_issued"] == issued + 1  # one token for all six


def test_fcm_expired_access_token_is_renewed(alice: User, stand: Providers) -> None:
    device = alice.android(stand.fcm)
    first = alice.notify()
    arrived(device, 1)
    issued = stand.fcm.stats()["tokens_issued"]
    stand.fcm.expire_tokens()  # every access token issued so far is refused from now on
    second = alice.notify()
    arrived(device, 2)
    assert [m["id"] for m in messages(device)] == [first["id"], second["id"]]
    refused = stand.fcm.refused(device.target)
    assert [(r.status, r.reason) for r in refused] == [(401, "UNAUTHENTICATED")]
    assert stand.fcm.stats()["tokens_issued"] == issued + 1
    alice.wait_state(device, lambda s: s["consecutiveFailures"] == 0, "recovered")


# -- WNS ----------------------------------------------------------------------------------------


def test_wns_toast_raw_and_toast_removals(alice: User, stand: Providers) -> None:
    w1, w2 = alice.windows(stand.wns), alice.windows(stand.wns)
    title = "Tom & Jerry <say> \"hi\" it's 'quoted'"
    body = "Grüße, 日本語 ✓ <&>\"' ]]> &amp;"
    n = alice.notify(groupName="chat", payload={"visualContent": {"title": title, "body": body}})
    n_position = alice.head()
    tag = wns_tag(n["id"])
    for device in (w1, w2):
        [d] = arrived(device, 1)
        assert d.kind == "wns/toast"
        assert d.details["title"] == title and d.details["body"] == body
        assert d.details["texts"] == [title, body]
        assert d.headers["x-wns-type"] == "wns/toast"
        assert d.headers["content-type"] == "text/xml"
        assert d.headers["x-wns-tag"] == tag
        assert d.headers["x-wns-priority"] == "1"
        assert 3590 <= int(d.headers["x-wns-ttl"]) <= 3600
        assert "x-wns-group" not in d.headers
        assert d.message == message(n, "alert", n_position)  # the launch attribute

    raw = alice.notify(payload={"rawContent": "ünïcödé raw <&>"})
    raw_position = alice.head()
    other = alice.notify(payload={"visualContent": {"title": "second"}}, priority="Low")
    other_position = alice.head()
    for device in (w1, w2):
        _, r, o = by_position(arrived(device, 3))
        assert r.kind == "wns/raw"
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["x-wns-priority"] == "2"
        assert r.payload == r.message == message(raw, "alert", raw_position)
        assert o.kind == "wns/toast" and o.headers["x-wns-priority"] == "3"
        assert o.message == message(other, "alert", other_position)

    # w1 reads n and dismisses `other`: w2's toasts leave Action Center; w1 is not told.
    alice.patch(n, {"readState": "read"}, w1)
    alice.patch(other, {"userActionState": "dismissed"}, w1)
    removals = arrived(w2, 5)[3:]
    tags = {tag, wns_tag(other["id"])}
    assert {d.headers["x-wns-match"] for d in removals} == {f"type:wns/toast;tag={t}" for t in tags}
    for d in removals:
        assert d.kind == "delete" and d.method == "DELETE"
        assert d.details["match"]["tag"] in tags and d.details["match"]["group"] is None

    # A state change that is not read/dismissed/activated is a raw sync.
    snoozed = alice.me.patch(
        f"/beta/me/notifications/{raw['id']}",
        json={"userActionState": "snoozed"},
        headers={"X-UNS-ID": w1.id},
    )
    assert snoozed.status_code == 200, snoozed.text
    snoozed_position = alice.head()
    d = arrived(w2, 6)[5]
    assert d.kind == "wns/raw"
    assert d.message == message(snoozed.json(), "sync", snoozed_position)

    # Deleting a notification deletes its toast.
    alice.delete(raw, w1)
    d = arrived(w2, 7)[6]
    assert d.kind == "delete"
    assert d.headers["x-wns-match"] == f"type:wns/toast;tag={wns_tag(raw['id'])}"

    barrier = alice.notify(payload={"visualContent": {"title": "barrier"}})
    arrived(w1, 4)
    arrived(w2, 8)
    kinds = [d.kind for d in by_position(stand.wns.accepted(w1.target))]
    assert kinds == ["wns/toast", "wns/raw", "wns/toast", "wns/toast"]
    assert messages(w1)[-1]["id"] == barrier["id"]


def test_webpush_endpoint_on_a_private_address_is_refused_by_default(tmp_path: Path) -> None:
    """By default (push_allow_private_endpoints false) a Web Push endpoint on loopback, a
    private network or a link-local address is refused at registration: Herald would POST
    wherever a device points it. (The other tests allow it: the stand-in is on 127.0.0.1.)"""
    assert Settings().push_allow_private_endpoints is False
    for server in servers("sqlite", tmp_path, push_allow_private_endpoints=False):
        user = User(server, server.register())
        channel = webpush_channel()
        for endpoint in (
            "https://127.0.0.1:8443/push/abc",
            "https://[::1]/push/abc",
            "https://10.1.2.3/push/abc",
            "https://169.254.169.254/latest/meta-data",
            "https://[::ffff:192.168.0.1]/push/abc",
        ):
            body = {
                "application": user.app.host_name,
                "platform": "webPush",
                "pushChannel": {**channel, "endpoint": endpoint},
            }
            r = user.me.post(SUBS, json=body)
            assert_graph_error(r, 400, "invalidRequest", "pushChannel.endpoint")
        public = {**channel, "endpoint": "https://fcm.googleapis.com/fcm/send/abc:def"}
        r = user.me.post(
            SUBS,
            json={"application": user.app.host_name, "platform": "webPush", "pushChannel": public},
        )
        assert r.status_code == 201, r.text


def test_wns_channel_on_another_host_is_refused(alice: User) -> None:
    for uri in (
        "https://wns2-par02p.notify.windows.com/w/?token=AwYAAAB",
        "https://127.0.0.1.example.net/?token=x",
    ):
        body = {
            "application": alice.app.host_name,
            "platform": "windows",
            "pushChannel": {"channelUri": uri},
        }
        r = alice.me.post(SUBS, json=body)
        error = assert_graph_error(r, 400, "invalidRequest", "pushChannel.channelUri")
        assert "pushChannel.channelUri" in error["message"]


# -- targeting ----------------------------------------------------------------------------------


def test_target_policy_filters_providers_and_live_gets_no_push(
    alice: User, stand: Providers
) -> None:
    browser = alice.webpush(stand.webpush)
    phone = alice.ios(stand.apns)
    android = alice.android(stand.fcm)
    pc = alice.windows(stand.wns)
    live = alice.subscribe("live", None)
    only = alice.notify(targetPolicy={"platformTypes": ["android", "windows"]})
    everyone = alice.notify()
    arrived(browser, 1)
    arrived(phone, 1)
    arrived(android, 2)
    arrived(pc, 2)
    assert [m["id"] for m in messages(browser)] == [everyone["id"]]
    assert [m["id"] for m in messages(phone)] == [everyone["id"]]
    assert [m["id"] for m in messages(android)] == [only["id"], everyone["id"]]
    assert [m["id"] for m in messages(pc)] == [only["id"], everyone["id"]]
    assert alice.subscription(live)["deliveryState"] == NEVER
    assert alice.subscription(live)["pushChannel"] is None


# -- gone, rejected -----------------------------------------------------------------------------


def test_gone_channels_get_nothing_until_registered_again(alice: User, stand: Providers) -> None:
    gone = {
        "webPush": alice.webpush(stand.webpush),
        "apns": alice.ios(stand.apns),
        "fcm": alice.android(stand.fcm),
        "wns": alice.windows(stand.wns),
    }
    statuses = {"webPush": 404, "apns": None, "fcm": None, "wns": 410}
    errors = {
        "webPush": "HTTP 404",
        "apns": "HTTP 410: Unregistered",
        "fcm": "HTTP 404: UNREGISTERED",
        "wns": "HTTP 410",
    }
    for name, device in gone.items():
        assert device.standin is not None
        device.standin.gone(device.target, statuses[name])
    healthy = [
        alice.webpush(stand.webpush),
        alice.ios(stand.apns),
        alice.android(stand.fcm),
        alice.windows(stand.wns),
    ]

    first = alice.notify()
    for name, device in gone.items():
        state = alice.wait_state(device, lambda s: s["goneDateTime"] is not None, f"{name} gone")
        assert state["consecutiveFailures"] == 1, (name, state)
        assert state["lastError"].startswith(errors[name]), (name, state)
        assert state["lastDeliveredDateTime"] is None
    refused = {name: len(d.standin.refused(d.target)) for name, d in gone.items() if d.standin}
    assert set(refused.values()) == {1}, refused

    second = alice.notify()
    for device in healthy:
        arrived(device, 2)
    for name, device in gone.items():
        assert device.standin is not None
        assert device.standin.accepted(device.target) == [], name
        assert len(device.standin.refused(device.target)) == 1, name  # nothing more was sent
        assert alice.state(device)["consecutiveFailures"] == 1

    # The device registers its channel again: the state is cleared and delivery resumes.
    for name in ("webPush", "apns", "fcm", "wns"):
        device = gone[name]
        assert device.standin is not None and device.channel is not None
        device.standin.revive(device.target)
        again = alice.me.post(
            SUBS,
            json={
                "application": alice.app.host_name,
                "platform": device.platform,
                "pushChannel": device.channel,
            },
        )
        assert again.status_code == 200, again.text
        assert again.json()["id"] == device.id
        assert again.json()["deliveryState"] == NEVER
    third = alice.notify()
    for name in ("webPush", "apns", "fcm", "wns"):
        [d] = arrived(gone[name], 1)
        assert d.message["id"] == third["id"], name
        alice.wait_state(gone[name], lambda s: s["lastDeliveredDateTime"] is not None, name)
    assert first["id"] != second["id"]


def test_configuration_mistakes_never_mark_devices_gone(alice: User, stand: Providers) -> None:
    """A token of another Firebase project (the app's service account is the wrong one) and a
    token APNs does not know (also what a token of the other APNs environment gets) are
    recorded on the subscription, but the device is not marked gone: a configuration mistake
    must not unregister every device of an app."""
    mismatch = alice.subscribe(
        "android", {"registrationToken": stand.fcm.new_token("another-project")}, stand.fcm
    )
    unknown = alice.subscribe("iOS", {"deviceToken": os.urandom(32).hex()}, stand.apns)
    alice.notify()
    for device, error in (
        (mismatch, "HTTP 403: SENDER_ID_MISMATCH"),
        (unknown, "HTTP 400: BadDeviceToken"),
    ):
        state = alice.wait_state(
            device, lambda s, e=error: (s["lastError"] or "").startswith(e), error
        )
        assert state["goneDateTime"] is None, state
        assert state["consecutiveFailures"] >= 1, state


def test_gone_drops_the_queued_pushes(alice: User, stand: Providers) -> None:
    """A retry waiting when the channel goes is dropped with it: after the device registers
    again it gets only what comes next, never the old retry."""
    device = alice.webpush(stand.webpush)
    stand.webpush.fault(503, 1, headers={"Retry-After": "2"}, target=device.target)
    waiting = alice.notify()
    [refusal] = wait_for(lambda: stand.webpush.refused(device.target), "the 503")
    alice.wait_state(device, lambda s: s["consecutiveFailures"] == 1, "the retry recorded")
    stand.webpush.gone(device.target)
    doomed = alice.notify()
    alice.wait_state(device, lambda s: s["goneDateTime"] is not None, "gone")
    first, second = stand.webpush.refused(device.target)
    assert (first.status, second.status) == (503, 410)
    assert second.at - first.at < 1.9  # gone while the first notification's retry was waiting
    stand.webpush.revive(device.target)
    assert device.channel is not None
    r = alice.me.post(
        SUBS,
        json={
            "application": alice.app.host_name,
            "platform": "webPush",
            "pushChannel": device.channel,
        },
    )
    assert r.status_code == 200 and r.json()["deliveryState"] == NEVER, r.text
    # Past the old retry's due time (2 s after the 503, plus a claim poll), a new notification:
    # had the retry survived, it would have been claimed and sent before this one.
    time.sleep(max(0.0, refusal.at + 4.0 - time.time()))
    fresh = alice.notify()
    arrived(device, 1)
    assert [m["id"] for m in messages(device)] == [fresh["id"]]
    assert waiting["id"] not in {m["id"] for m in messages(device)}
    assert doomed["id"] != fresh["id"]


def test_rejected_push_is_not_retried(alice: User, stand: Providers) -> None:
    android = alice.android(stand.fcm)
    browser = alice.webpush(stand.webpush)
    stand.fcm.fault(400, 1, reason="INVALID_ARGUMENT", target=android.target)
    stand.webpush.fault(400, 1, target=browser.target)
    refused = alice.notify()
    for device, error in ((android, "HTTP 400: INVALID_ARGUMENT"), (browser, "HTTP 400")):
        state = alice.wait_state(device, lambda s: s["lastError"] is not None, "rejected")
        assert state["consecutiveFailures"] == 1
        assert state["lastError"].startswith(error), state
        assert state["goneDateTime"] is None and state["lastDeliveredDateTime"] is None
    accepted = alice.notify()
    for device in (android, browser):
        arrived(device, 1)
        assert [m["id"] for m in messages(device)] == [accepted["id"]]  # never the rejected one
        assert device.standin is not None and len(device.standin.refused(device.target)) == 1
        state = alice.wait_state(device, lambda s: s["consecutiveFailures"] == 0, "delivered")
        assert state["lastError"] is None and state["lastDeliveredDateTime"] is not None
    assert refused["id"] != accepted["id"]


def test_a_web_push_redirect_is_not_followed(alice: User, stand: Providers) -> None:
    """An endpoint answering 307 towards another endpoint: Herald does not follow it (a redirect
    could point anywhere, a private address too); the push is rejected, nothing arrives."""
    browser = alice.webpush(stand.webpush)
    elsewhere = alice.webpush(stand.webpush)
    assert browser.channel is not None and elsewhere.channel is not None
    location = elsewhere.channel["endpoint"]
    stand.webpush.fault(307, 1, headers={"Location": location}, target=browser.target)
    alice.notify(targetPolicy={"platformTypes": ["webPush"]})
    arrived(elsewhere, 1)  # the barrier: the same notification reached the other device
    state = alice.wait_state(browser, lambda s: s["lastError"] is not None, "rejected")
    assert state["lastError"] == "HTTP 307", state
    assert stand.webpush.accepted(browser.target) == []
    assert len(stand.webpush.accepted(elsewhere.target)) == 1  # its own push, not a redirected one


# -- metrics and credentials --------------------------------------------------------------------


def test_metrics(server: Server, stand: Providers, alice: User) -> None:
    before = metrics(server)
    browser = alice.webpush(stand.webpush)
    alice.notify()
    arrived(browser, 1)
    # A second app with no APNs credentials yet: a credentials failure, then delivery.
    bare = server.register()
    bob = User(server, bare)
    phone = bob.ios(stand.apns)
    n = bob.notify()
    bob.wait_state(phone, lambda s: s["lastError"] is not None, "missing credentials")
    assert bob.state(phone)["lastError"] == f"no APNs credentials for {bare.host_name}"
    set_apns(server, bare, stand.apns, stand.credentials)
    [d] = arrived(phone, 1)
    assert d.message["id"] == n["id"]
    bob.wait_state(phone, lambda s: s["consecutiveFailures"] == 0, "delivered")

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        now = metrics(server)
        labels = {"provider": "apns", "outcome": "delivered"}
        done = sample(now, "herald_push_attempts_total", **labels) > sample(
            before, "herald_push_attempts_total", **labels
        )
        return now if done else None

    after = wait_for(counted, "the delivered APNs attempt counted")

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("herald_push_attempts_total", provider="webPush", outcome="delivered") == 1
    assert grew("herald_push_attempts_total", provider="apns", outcome="delivered") == 1
    assert grew("herald_push_attempts_total", provider="apns", outcome="retry") >= 1
    assert grew("herald_push_credential_failures_total", provider="apns") >= 1
    assert grew("herald_push_credential_failures_total", provider="apns") == grew(
        "herald_push_attempts_total", provider="apns", outcome="retry"
    )
    assert grew("herald_push_seconds_count", provider="webPush") == 1
    assert grew("herald_push_seconds_bucket", provider="webPush", le="+Inf") == 1
    assert sample(after, "herald_push_seconds_sum", provider="webPush") > 0
    queued = {dict(labels)["provider"] for name, labels in after if name == "herald_push_queued"}
    assert queued == {"webPush", "apns", "fcm", "wns"}
    server.close_clients()


def _vapid_pem(path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(point).decode().rstrip("=")


def _secret_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def test_cli_push_credentials(server: Server, stand: Providers, tmp_path: Path) -> None:
    app = server.register()
    host = app.host_name
    assert json.loads(cli(server, "app", "push-show", host).output) == {}

    # A file that is not a .p8 key fails cleanly and stores nothing.
    not_a_key = tmp_path / "AuthKey_NOPE.p8"
    not_a_key.write_text("this is not a key\n")
    bad = cli(
        server,
        "app",
        "push-set",
        "apns",
        host,
        "--key-file",
        str(not_a_key),
        "--key-id",
        "NOPE123456",
        "--team-id",
        stand.apns.team_id,
        "--topic",
        stand.apns.topic,
        ok=False,
    )
    assert bad.exit_code == 2, bad.output
    assert "not a usable .p8 key" in bad.output and "Traceback" not in bad.output
    bad_vapid = tmp_path / "vapid.pem"
    bad_vapid.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    bad = cli(server, "app", "push-set", "webpush", host, "--key-file", str(bad_vapid), ok=False)
    assert bad.exit_code == 2 and "not a P-256 private key" in bad.output, bad.output
    assert json.loads(cli(server, "app", "push-show", host).output) == {}

    outputs = [
        set_apns(server, app, stand.apns, stand.credentials).output,
        set_fcm(server, app, stand.fcm, stand.credentials).output,
        set_wns(server, app, stand.wns).output,
    ]
    vapid_file = tmp_path / "vapid-good.pem"
    public = _vapid_pem(vapid_file)
    outputs.append(
        cli(server, "app", "push-set", "webpush", host, "--key-file", str(vapid_file)).output
    )
    shown_text = cli(server, "app", "push-show", host).output
    account = stand.fcm.service_account()
    assert json.loads(shown_text) == {
        "webPush": {"applicationServerKey": public},
        "apns": {
            "keyId": stand.apns.key_id,
            "teamId": stand.apns.team_id,
            "topic": stand.apns.topic,
            "environment": "production",
        },
        "fcm": {"projectId": account["project_id"], "clientEmail": account["client_email"]},
        "wns": {"clientId": stand.wns.client_id},
    }
    secrets = [
        *_secret_lines(stand.apns.key_pem),
        *_secret_lines(account["private_key"]),
        account["private_key_id"],
        stand.wns.client_secret,
        *_secret_lines(vapid_file.read_text()),
    ]
    for text in [shown_text, *outputs]:
        for secret in secrets:
            assert secret not in text
    assert cli(server, "app", "push-key", host).output.strip() == public

    removed = cli(server, "app", "push-unset", host, "apns")
    assert "removed" in removed.output
    assert "apns" not in json.loads(cli(server, "app", "push-show", host).output)
    again = cli(server, "app", "push-unset", host, "apns", ok=False)
    assert again.exit_code == 1 and "has no apns credentials" in again.output
    cli(server, "app", "push-unset", app.client_id, "wns")  # by client id too
    assert set(json.loads(cli(server, "app", "push-show", host).output)) == {"webPush", "fcm"}
    missing = cli(server, "app", "push-show", "no-such-app.example.com", ok=False)
    assert missing.exit_code == 1 and "no app" in missing.output
