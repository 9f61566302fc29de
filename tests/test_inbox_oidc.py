"""The web inbox signing in through an external OpenID Connect provider (docs/inbox.md, "With an
external identity provider"): Chromium, a real `herald serve`, and the strict IdP stand-in
(tests/standins/idp.py), which refuses anything a real IdP would refuse and records every grant.

Herald trusts the stand-in (`HERALD_ISSUERS`), the page signs in there (`HERALD_INBOX_*`), the
IdP's client id is a registered Herald app (`herald app create --client-id`), and the app server
posts with an app-only token of Herald's embedded issuer for that client id.

Screenshots: `$HERALD_TEST_ARTIFACTS/inbox-oidc/<step>.png` (default `<repo>/test-artifacts`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.browser import (
    WAIT_MS,
    Api,
    App,
    Browser,
    Herald,
    Inbox,
    require_browser,
)
from tests.standins.idp import IdpStandIn

if TYPE_CHECKING:
    from playwright.sync_api import Page

try:
    from playwright.sync_api import expect
except ImportError:  # require_browser() skips (locally) or fails (CI)
    expect = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parent.parent
CLIENT = "herald-inbox"  # the page's client id at the IdP, registered with Herald as an app
HOST = "inbox.example.com"
AUDIENCE = "api://herald"
SCOPE = f"openid offline_access {AUDIENCE}/Notifications.ReadWrite.CreatedByApp"
TTL = 6  # seconds: the IdP's access tokens expire during the test
# What must never be left in the page's address once the sign-in is done.
RESPONSE_PARAMS = ("code", "state", "iss", "error", "error_description", "session_state")

pytestmark = pytest.mark.timeout(120)


@dataclass
class Stack:
    herald: Herald
    idp: IdpStandIn
    app: App


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Herald trusting the IdP stand-in and signing its inbox in there; the IdP knows the inbox
    as a public client whose only redirect URI is `<herald>/inbox/`, and allows its origin."""
    require_browser()
    herald = Herald(tmp_path_factory.mktemp("herald-oidc"))
    idp = IdpStandIn(
        clients={CLIENT: [herald.inbox()]},
        allowed_origins=[herald.origin],
        audience=AUDIENCE,
        access_token_ttl=TTL,
    )
    idp.start()
    try:
        trusted = {"issuer": idp.issuer, "audience": AUDIENCE, "discovery_url": idp.discovery_url}
        herald.env = {
            "HERALD_ISSUERS": json.dumps([trusted]),
            "HERALD_INBOX_ISSUER": idp.issuer,
            "HERALD_INBOX_CLIENT_ID": CLIENT,
            "HERALD_INBOX_SCOPE": SCOPE,
        }
        herald.start()
        created = json.loads(
            herald.cli("app", "create", "--client-id", CLIENT, "--host-name", HOST)
        )
        assert created["clientId"] == CLIENT, created
        yield Stack(herald, idp, App(CLIENT, HOST))
    finally:
        herald.stop()
        idp.stop()


@pytest.fixture
def idp(stack: Stack) -> IdpStandIn:
    stack.idp.reset()
    stack.idp.access_token_ttl = TTL
    return stack.idp


def shot(page: Page, step: str) -> Path:
    root = os.environ.get("HERALD_TEST_ARTIFACTS") or str(REPO / "test-artifacts")
    path = Path(root) / "inbox-oidc" / f"{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_clean_address(page: Page, herald: Herald, *secrets: str) -> None:
    """The page's address is `<herald>/inbox/` again: no authorization response parameters and
    no token left in it (or in its history entry)."""
    for url in (page.url, page.evaluate("location.href")):
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == herald.inbox(), url
        left = set(parse_qs(parts.query)) & set(RESPONSE_PARAMS)
        assert not left, f"{sorted(left)} left in the address: {url}"
        assert "token" not in url.lower(), url
        for secret in secrets:
            assert secret not in url, f"a token or code is in the address: {url}"


def sign_in_at_idp(inbox: Inbox, idp: IdpStandIn, step: str) -> Page:
    """Click "Sign in" on the inbox; the IdP's login form is shown (and screenshotted)."""
    page = inbox.page
    sign_in = page.locator("#sign-in")
    expect(sign_in).to_be_visible()
    expect(sign_in).to_be_enabled()
    inbox.expect_state("signed-out")
    sign_in.click()
    expect(page).to_have_url(re.compile("^" + re.escape(idp.authorization_endpoint) + r"\?"))
    expect(page.get_by_label("Username")).to_be_visible()
    shot(page, step)
    return page


def test_config_names_the_identity_provider(stack: Stack) -> None:
    with httpx.Client(timeout=10, trust_env=False) as http:
        config = http.get(stack.herald.inbox("config.json")).json()
        csp = http.get(stack.herald.inbox()).headers["content-security-policy"]
    assert config == {
        "signIn": "oidc",
        "issuer": stack.idp.issuer,
        "clientId": CLIENT,
        "scope": SCOPE,
    }
    # The page may talk to the IdP (discovery, token endpoint) and nothing else foreign.
    connect = next(d for d in csp.split(";") if d.strip().startswith("connect-src"))
    assert stack.idp.origin in connect.split()


def test_sign_in_live_feed_and_renewal_with_refresh_tokens(
    stack: Stack,
    idp: IdpStandIn,
    browser: Browser,
) -> None:
    herald, user = stack.herald, "ada"
    device = browser.device("laptop")
    inbox = device.open(herald.inbox())
    page = inbox.page
    expect(page.locator("#sign-in")).to_be_visible()
    shot(page, "signed-out")

    sign_in_at_idp(inbox, idp, "idp-login")
    (authorization,) = idp.authorizations()
    params = authorization.params
    assert params["response_type"] == "code"
    assert params["client_id"] == CLIENT
    assert params["redirect_uri"] == herald.inbox()
    assert params["scope"].split() == SCOPE.split()
    assert params["code_challenge_method"] == "S256"  # the IdP refuses anything else anyway
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", params["code_challenge"])
    assert len(params.get("state", "")) >= 16, "state must be present and unguessable"

    page.get_by_label("Username").fill(user)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(re.compile("^" + re.escape(herald.inbox())))
    inbox.expect_live()
    (first,) = idp.wait_issued(1, grant_type="authorization_code")
    assert first.client_id == CLIENT and first.user == user
    assert first.origin == herald.origin  # redeemed by the page itself, cross-origin (CORS)
    assert first.claims["scp"] == "Notifications.ReadWrite.CreatedByApp"
    assert_clean_address(page, herald, first.access_token, first.refresh_token or "-")
    expect(page.locator("#alert")).to_be_hidden()
    shot(page, "live")

    api = Api(herald, stack.app, user)
    try:
        hello = api.notify("Hello from the app", "Signed in through the IdP")
        inbox.expect_shown(hello["id"], "Hello from the app", "Signed in through the IdP")
        shot(page, "first-notification")
        # A second tab of the same browser shares the session (and its refresh token).
        other = device.open(herald.inbox(), tab="laptop-tab2")
        other.expect_live()
        other.expect_shown(hello["id"], "Hello from the app")
        assert len(idp.authorizations()) == 1, "the second tab signed in again"

        # The first access token expires (TTL seconds); the page renews it with the refresh
        # token, whether ahead of time or when Herald ends the streams (tokenExpired). Wait for
        # a renewal made after that expiry: then the page can only be using a token issued
        # after the first one died. Both tabs renew at once: refresh tokens rotate, so a tab
        # that used one already used by the other would be refused (and end the session).
        expired_at = float(first.claims["exp"])
        deadline = time.monotonic() + (expired_at - time.time()) + WAIT_MS / 1000
        while not [i for i in idp.issued("refresh_token") if i.at >= expired_at]:
            assert time.monotonic() < deadline, f"no renewal after expiry: {idp.describe()}"
            page.wait_for_timeout(200)
        assert time.time() >= expired_at
        later = api.notify("After the token expired", "Still live")
        for tab in (inbox, other):
            tab.expect_live()
            tab.expect_shown(later["id"], "After the token expired", "Still live")
            tab.expect_feed([later["id"], hello["id"]])
        shot(page, "after-renewal")
    finally:
        api.close()

    renewals = idp.issued("refresh_token")
    assert renewals, idp.describe()
    for renewal in renewals:
        assert renewal.client_id == CLIENT and renewal.user == user
        assert renewal.origin == herald.origin
    # Never a code used twice or a rotated refresh token replayed (which would revoke the
    # session at a real IdP), never a refused request.
    assert idp.refused() == [], idp.describe()
    assert len(idp.issued("authorization_code")) == 1
    assert_clean_address(page, herald, *(i.access_token for i in idp.issued()))

    # A reload keeps the session (localStorage): no new trip to the IdP.
    page.reload()
    inbox.expect_live()
    inbox.expect_feed([later["id"], hello["id"]])
    assert len(idp.authorizations()) == 1
    assert idp.refused() == [], idp.describe()
    browser.check()


def test_a_denied_sign_in_shows_an_alert(
    stack: Stack,
    idp: IdpStandIn,
    browser: Browser,
) -> None:
    herald = stack.herald
    device = browser.device("denied")
    inbox = device.open(herald.inbox())
    page = sign_in_at_idp(inbox, idp, "denied-idp-login")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page).to_have_url(re.compile("^" + re.escape(herald.inbox())))
    alert = page.locator("#alert")
    expect(alert).to_be_visible()
    expect(alert).not_to_be_empty()
    expect(alert).to_have_attribute("role", "alert")
    inbox.expect_state("signed-out")
    expect(page.locator("#sign-in")).to_be_visible()  # and the person can try again
    expect(page.locator("main h1")).to_be_visible()
    shot(page, "denied")
    assert_clean_address(page, herald)
    (refusal,) = idp.refused()
    assert refusal.error == "access_denied" and refusal.endpoint == "login"
    assert idp.seen("/token") == [], "nothing to redeem after a denial"
    browser.check()


def test_a_forged_authorization_response_is_not_redeemed(
    stack: Stack, idp: IdpStandIn, browser: Browser
) -> None:
    """An authorization response the page did not ask for (a `state` it never sent: login CSRF,
    RFC 6749 §10.12) is not redeemed: the page says so and stays signed out."""
    herald = stack.herald
    device = browser.device("forged")
    inbox = device.open(herald.inbox("?code=forged-code&state=forged-state"))
    page = inbox.page
    alert = page.locator("#alert")
    expect(alert).to_be_visible()
    expect(alert).not_to_be_empty()
    inbox.expect_state("signed-out")
    expect(page.locator("#sign-in")).to_be_visible()
    shot(page, "forged-response")
    assert_clean_address(page, herald)
    assert idp.seen("/token") == [], idp.describe()
    browser.check()


def test_an_unsolicited_error_response_does_not_speak_for_the_idp(
    stack: Stack, idp: IdpStandIn, browser: Browser
) -> None:
    """An error "response" the page never asked for (no sign-in begun, a state it never sent)
    is anyone's link: its `error_description` must not be shown as the IdP's word (content
    spoofing: "call this number"). The state binds error responses too (RFC 6749 §4.1.2.1)."""
    herald = stack.herald
    device = browser.device("spoofed")
    lure = "Your account is locked. Call 555-0100 now."
    query = urlencode({"error": "access_denied", "error_description": lure, "state": "forged"})
    inbox = device.open(herald.inbox("?" + query))
    page = inbox.page
    inbox.expect_state("signed-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert_clean_address(page, herald)
    shot(page, "unsolicited-error")
    expect(page.locator("body")).not_to_contain_text("555-0100")
    browser.check()
