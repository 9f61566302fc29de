"""Webhooks against a running server, checked by the test's own receiver on 127.0.0.1: signed
per Standard Webhooks (verified with the `standardwebhooks` package), in order per user, retried
after a 500 and a timeout, given up after the configured time. (tests/test_changefeed.py checks
that a private address is refused by a server with the default guard.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import standardwebhooks

from tests.conftest import RegisteredApp, Server
from tests.hooks import HANG, Receiver, receiver

TIMEOUT = 0.5
BASE = 0.2


@pytest.fixture
def hooked(server: Server) -> Server:
    """The session's server: it posts to private addresses (the receiver), with short timeouts
    and retries (tests/conftest.py)."""
    assert server.settings.webhook_timeout == TIMEOUT
    assert server.settings.webhook_backoff_base == BASE
    return server


@pytest.fixture
def sink() -> Iterator[Receiver]:
    yield from receiver(hang=TIMEOUT * 3)


def app_client(server: Server, app: RegisteredApp) -> httpx.Client:
    return server.client(server.token(app, None))


def register(
    server: Server, app: RegisteredApp, url: str, **fields: Any
) -> tuple[httpx.Client, dict[str, Any]]:
    c = app_client(server, app)
    r = c.post("/beta/notificationWebhooks", json={"url": url, **fields})
    assert r.status_code == 201, r.text
    return c, r.json()


def post(server: Server, app: RegisteredApp, user: str, c: httpx.Client | None = None) -> str:
    """Post one notification for `user` (through `c`, a client of theirs, if given)."""
    c = c or server.client(server.token(app, user))
    body = {
        "targetHostName": app.host_name,
        "appNotificationId": str(uuid.uuid4()),
        "payload": {"visualContent": {"title": "hi"}},
    }
    r = c.post("/beta/me/notifications", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_a_batch_is_signed_and_a_tampered_one_is_refused(hooked: Server, sink: Receiver) -> None:
    app = hooked.register()
    _, hook = register(hooked, app, sink.url)
    assert hook["secret"].startswith("whsec_") and hook["status"] == "active"
    nid = post(hooked, app, "signer")
    sink.wait(lambda got: len(got) >= 1)
    got = sink.received[0]
    verifier = standardwebhooks.Webhook(hook["secret"])
    payload = verifier.verify(got.body, got.headers)
    assert payload["type"] == "notifications.changed"
    assert payload["data"]["webhookId"] == hook["id"] and payload["data"]["app"] == app.host_name
    [event] = payload["data"]["changes"]
    assert event["changeType"] == "created" and event["notificationId"] == nid
    assert event["userId"] == "signer" and event["position"] == 1
    assert event["notification"]["readState"] == "unread"
    tampered = got.body.replace(b'"created"', b'"deleted"')
    assert tampered != got.body
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(tampered, got.headers)
    other = standardwebhooks.Webhook("whsec_" + "QUJD" * 8)  # another secret
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        other.verify(got.body, got.headers)


def test_a_chosen_secret_is_used_and_never_shown_again(hooked: Server, sink: Receiver) -> None:
    app = hooked.register()
    secret = "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
    c, hook = register(hooked, app, sink.url, secret=secret, changeTypes=["deleted"])
    assert hook["secret"] == secret and hook["changeTypes"] == ["deleted"]
    shown = c.get(f"/beta/notificationWebhooks/{hook['id']}").json()
    assert "secret" not in shown and shown["delivery"]["consecutiveFailures"] == 0
    assert all("secret" not in h for h in c.get("/beta/notificationWebhooks").json()["value"])
    nid = post(hooked, app, "chooser")
    user = hooked.client(hooked.token(app, "chooser"))
    assert user.delete(f"/beta/me/notifications/{nid}").status_code == 204
    sink.wait(lambda got: len(got) >= 1)
    [got] = sink.received
    standardwebhooks.Webhook(secret).verify(got.body, got.headers)
    assert [e["changeType"] for e in got.events] == ["deleted"]  # only the kinds it takes


def test_order_per_user_holds_across_many_changes(hooked: Server, sink: Receiver) -> None:
    app = hooked.register()
    register(hooked, app, sink.url)
    users = [f"order-{i}" for i in range(4)]
    expected: dict[str, int] = {}

    def work(user: str) -> None:
        c = hooked.client(hooked.token(app, user))
        count = 0
        for i in range(12):
            nid = post(hooked, app, user, c)
            count += 1
            if i % 3 == 0:
                r = c.patch(f"/beta/me/notifications/{nid}", json={"readState": "read"})
                assert r.status_code in (200, 204), r.text
                count += 1
            if i % 4 == 0:
                assert c.delete(f"/beta/me/notifications/{nid}").status_code == 204
                count += 1
        expected[user] = count

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, users))
    total = sum(expected.values())
    sink.wait(lambda got: len({e["id"] for r in got for e in r.events}) >= total)
    events = sink.events()
    assert len(events) == total
    for user in users:
        positions = [e["position"] for e in events if e["userId"] == user]
        assert positions == list(range(1, expected[user] + 1)), user
    seqs = [e["sequence"] for e in events]
    assert seqs == sorted(seqs)
    kinds = {e["changeType"] for e in events}
    assert kinds == {"created", "updated", "deleted"}


def test_retries_follow_a_500_and_a_timeout(hooked: Server, sink: Receiver) -> None:
    app = hooked.register()
    c, hook = register(hooked, app, sink.url)
    sink.plan = [500, HANG]
    post(hooked, app, "retried")
    sink.wait(lambda got: len(got) >= 3)
    first, second, third = sink.received[:3]
    assert (first.answer, second.answer, third.answer) == (500, HANG, 200)
    # The same batch, resent (the envelope's timestamp is the attempt's).
    assert first.events == second.events == third.events
    assert (
        first.headers["webhook-id"] == second.headers["webhook-id"] == third.headers["webhook-id"]
    )
    # Backoff: BASE after the first failure, 2 * BASE after the second (its timeout first;
    # the receiver notes a POST once it has read it, a little after Herald's clock started).
    assert second.at - first.at >= BASE * 0.9
    assert third.at - second.at >= TIMEOUT + 2 * BASE - 0.15
    state = wait_state(c, hook["id"], lambda d: d["lastStatusCode"] == 200)
    assert state["consecutiveFailures"] == 0 and state["lastSuccessDateTime"] is not None
    assert state["nextAttemptDateTime"] is None and state["lagSeconds"] == 0


def test_delivery_gives_up_and_resumes_when_enabled_again(hooked: Server, sink: Receiver) -> None:
    app = hooked.register()
    c, hook = register(hooked, app, sink.url)
    sink.plan = [500] * 1000
    nid = post(hooked, app, "patient")
    failed = wait_state(c, hook["id"], lambda d: d["consecutiveFailures"] >= 2)
    assert failed["lastStatusCode"] == 500 and failed["lastError"] == "HTTP 500"
    assert failed["nextAttemptDateTime"] is not None and failed["lagSeconds"] > 0
    shown = wait_hook(c, hook["id"], lambda h: h["status"] == "failed", timeout=15)
    assert shown["delivery"]["failingSinceDateTime"] is not None
    attempts = len(sink.received)
    sink.plan = []
    r = c.patch(f"/beta/notificationWebhooks/{hook['id']}", json={"status": "active"})
    assert r.status_code == 200 and r.json()["status"] == "active"
    sink.wait(lambda got: len(got) > attempts and got[-1].answer == 200)
    assert [e["notificationId"] for e in sink.events()] == [nid]


def wait_hook(c: httpx.Client, id: str, done: Any, timeout: float = 10.0) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        shown: dict[str, Any] = c.get(f"/beta/notificationWebhooks/{id}").json()
        if done(shown):
            return shown
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)


def wait_state(c: httpx.Client, id: str, done: Any) -> dict[str, Any]:
    state: dict[str, Any] = wait_hook(c, id, lambda h: done(h["delivery"]))["delivery"]
    return state


def test_bad_requests_get_graph_errors(server: Server, app: RegisteredApp) -> None:
    c = app_client(server, app)
    cases: list[tuple[Any, int]] = [
        ({}, 400),
        ({"url": "https://hooks.example.net/h", "secret": "short"}, 400),
        ({"url": "https://hooks.example.net/h", "changeTypes": ["read"]}, 400),
        ({"url": "https://hooks.example.net/h", "changeTypes": []}, 400),
        ({"url": "https://hooks.example.net/h", "status": "failed"}, 400),
        ({"url": "https://hooks.example.net/h", "color": "red"}, 400),
        ({"url": "https://u:p@hooks.example.net/h"}, 400),
    ]
    for body, status in cases:
        r = c.post("/beta/notificationWebhooks", json=body)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    assert c.get("/beta/notificationWebhooks").json()["value"] == []
    assert c.get("/beta/notificationWebhooks/nope").status_code == 404
    assert c.delete("/beta/notificationWebhooks/nope").status_code == 404
    user = server.client(server.token(app, "someone"))
    assert user.get("/beta/notificationWebhooks").status_code == 403
    assert server.client().get("/beta/notificationWebhooks").status_code == 401


def test_another_apps_webhook_is_invisible(hooked: Server, sink: Receiver) -> None:
    a, b = hooked.register(), hooked.register()
    _, hook = register(hooked, a, sink.url)
    other = app_client(hooked, b)
    assert other.get(f"/beta/notificationWebhooks/{hook['id']}").status_code == 404
    r = other.patch(f"/beta/notificationWebhooks/{hook['id']}", json={"status": "disabled"})
    assert r.status_code == 404
    assert other.delete(f"/beta/notificationWebhooks/{hook['id']}").status_code == 404
    post(hooked, b, "someone")  # b's change: not a's
    nid = post(hooked, a, "someone")
    sink.wait(lambda got: len(got) >= 1)
    assert [e["notificationId"] for e in sink.events()] == [nid]
    assert json.loads(sink.received[0].body)["data"]["app"] == a.host_name


def test_a_disabled_webhook_gets_nothing_until_enabled(hooked: Server, sink: Receiver) -> None:
    app = hooked.register()
    c, hook = register(hooked, app, sink.url, status="disabled")
    nid = post(hooked, app, "quiet")
    import time

    time.sleep(0.3)  # several poll intervals: nothing may arrive
    assert sink.received == []
    r = c.patch(f"/beta/notificationWebhooks/{hook['id']}", json={"status": "active"})
    assert r.status_code == 200
    sink.wait(lambda got: len(got) >= 1)
    assert [e["notificationId"] for e in sink.events()] == [nid]
    assert c.delete(f"/beta/notificationWebhooks/{hook['id']}").status_code == 204
    assert c.get(f"/beta/notificationWebhooks/{hook['id']}").status_code == 404


def test_openapi_describes_the_feed_and_webhooks(server: Server) -> None:
    doc = server.client().get("/openapi.json").json()
    assert {"get"} <= set(doc["paths"]["/beta/notificationChanges"])
    assert {"get", "post"} <= set(doc["paths"]["/beta/notificationWebhooks"])
    assert {"get", "patch", "delete"} <= set(doc["paths"]["/beta/notificationWebhooks/{id}"])
    schemas = doc["components"]["schemas"]
    assert {"changeType", "userId", "notificationId", "position", "sequence"} <= set(
        schemas["ChangeEvent"]["properties"]
    )
    assert schemas["WebhookCreate"]["required"] == ["url"]
