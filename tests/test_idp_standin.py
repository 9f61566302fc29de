"""The OIDC identity provider stand-in (tests/standins/idp.py) verifies the protocol: a correct
authorization code flow with PKCE yields tokens Herald's own verifier accepts, and every wrong
request is refused with the standard error, the way a strict IdP refuses it."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from joserfc import jwt

from herald.auth.tokens import IssuerConfig, TokenVerifier, require_permission
from herald.errors import AccessDenied, Unauthenticated
from tests.standins.idp import IdpStandIn, s256

CLIENT = "herald-inbox"
OTHER = "other-spa"
HERALD = "http://127.0.0.1:9"  # never contacted: the tests do not follow redirects
REDIRECT = f"{HERALD}/inbox/"
FOREIGN = "http://evil.example"


@pytest.fixture
def idp() -> Iterator[IdpStandIn]:
    clients = {CLIENT: [REDIRECT], OTHER: ["http://127.0.0.1:9/other/"]}
    with IdpStandIn(clients=clients, allowed_origins=[HERALD]) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, follow_redirects=False) as client:
        yield client


def scope_of(idp: IdpStandIn, *extra: str) -> str:
    return " ".join(("openid", *extra, idp.api_scope()))


class Pkce:
    def __init__(self) -> None:
        self.verifier = secrets.token_urlsafe(48)  # 64 characters
        digest = hashlib.sha256(self.verifier.encode()).digest()
        self.challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class FormParser(HTMLParser):
    """The login form: its action, its fields and the labels of its controls."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.labels: dict[str, str] = {}  # for= -> text
        self.buttons: list[tuple[str, str]] = []  # (value, text)
        self._label: str | None = None
        self._button: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = a.get("action")
        elif tag == "input" and a.get("type") == "hidden":
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "label":
            self._label = a.get("for")
        elif tag == "button":
            self._button = a.get("value", "")

    def handle_data(self, data: str) -> None:
        if self._label is not None and data.strip():
            self.labels[self._label] = data.strip()
        if self._button is not None and data.strip():
            self.buttons.append((self._button, data.strip()))

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label = None
        elif tag == "button":
            self._button = None


@dataclass
class Flow:
    code: str
    state: str
    pkce: Pkce
    redirect: dict[str, list[str]]


def authorize(
    http: httpx.Client, idp: IdpStandIn, pkce: Pkce | None = None, **params: str | None
) -> httpx.Response:
    pkce = pkce or Pkce()
    query: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "scope": scope_of(idp, "offline_access"),
        "state": "st-" + secrets.token_urlsafe(8),
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "nonce": "n-0S6_WzA2Mj",
    }
    query.update(params)
    return http.get(
        idp.authorization_endpoint, params={k: v for k, v in query.items() if v is not None}
    )


def login_form(response: httpx.Response) -> FormParser:
    assert response.status_code == 200, response.text
    form = FormParser()
    form.feed(response.text)
    return form


def submit(
    http: httpx.Client, idp: IdpStandIn, form: FormParser, action: str, user: str = "ada"
) -> httpx.Response:
    assert form.action is not None
    data = {**form.fields, "username": user, "action": action}
    return http.post(urljoin(idp.url, form.action), data=data)


def redirected_to(response: httpx.Response) -> tuple[str, dict[str, list[str]]]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}{parts.path}", parse_qs(parts.query)


def sign_in(http: httpx.Client, idp: IdpStandIn, user: str = "ada", **params: str | None) -> Flow:
    pkce = Pkce()
    state = "st-" + secrets.token_urlsafe(8)
    form = login_form(authorize(http, idp, pkce, state=state, **params))
    target, query = redirected_to(submit(http, idp, form, "login", user))
    assert target == REDIRECT
    assert query["state"] == [state]
    assert query["iss"] == [idp.issuer]
    return Flow(query["code"][0], state, pkce, query)


def token(http: httpx.Client, idp: IdpStandIn, **form: str | None) -> httpx.Response:
    headers = {"Origin": form.pop("origin") or ""} if "origin" in form else {}
    data = {k: v for k, v in form.items() if v is not None}
    return http.post(idp.token_endpoint, data=data, headers=headers)


def redeem(http: httpx.Client, idp: IdpStandIn, flow: Flow, **over: str | None) -> httpx.Response:
    form: dict[str, str | None] = {
        "grant_type": "authorization_code",
        "code": flow.code,
        "redirect_uri": REDIRECT,
        "client_id": CLIENT,
        "code_verifier": flow.pkce.verifier,
    }
    form.update(over)
    return token(http, idp, **form)


def refresh(
    http: httpx.Client, idp: IdpStandIn, refresh_token: str, **over: str | None
) -> httpx.Response:
    form: dict[str, str | None] = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": CLIENT,
    }
    form.update(over)
    return token(http, idp, **form)


def oauth_error(response: httpx.Response, error: str, status: int = 400) -> str:
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    return str(body["error_description"])


def verifier(idp: IdpStandIn, *, via: str = "discovery", **kw: Any) -> TokenVerifier:
    if via == "discovery":
        cfg = IssuerConfig(idp.issuer, "api://herald", discovery_url=idp.discovery_url)
    else:
        cfg = IssuerConfig(idp.issuer, "api://herald", jwks_url=idp.jwks_url)
    return TokenVerifier(local=None, issuers=[cfg], **kw)


# -- discovery ----------------------------------------------------------------------------------


def test_discovery_document_and_jwks(idp: IdpStandIn, http: httpx.Client) -> None:
    doc = http.get(idp.discovery_url).json()
    assert doc["issuer"] == idp.issuer
    assert doc["issuer"].startswith(idp.url + "/")  # an issuer with a path, like Keycloak's
    assert doc["authorization_endpoint"] == idp.authorization_endpoint
    assert doc["token_endpoint"] == idp.token_endpoint
    assert doc["jwks_uri"] == idp.jwks_url
    assert doc["response_types_supported"] == ["code"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert set(doc["grant_types_supported"]) == {"authorization_code", "refresh_token"}
    assert {"openid", "offline_access", idp.api_scope()} <= set(doc["scopes_supported"])
    (key,) = http.get(idp.jwks_url).json()["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert key["kid"] == idp.kid
    assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()


# -- the correct flow ---------------------------------------------------------------------------


async def test_correct_flow_yields_tokens_herald_accepts(idp: IdpStandIn) -> None:
    with httpx.Client(timeout=10, follow_redirects=False) as http:
        response = authorize(http, idp)
        form = login_form(response)
        assert response.headers["cache-control"] == "no-store"
        assert form.labels == {"username": "Username"}
        assert ("login", "Sign in") in form.buttons and ("cancel", "Cancel") in form.buttons
        (seen,) = idp.authorizations()
        assert seen.params["code_challenge_method"] == "S256"
        flow = sign_in(http, idp, "ada")
        answer = redeem(http, idp, flow, origin=HERALD)
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["access-control-allow-origin"] == HERALD
        body = answer.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == idp.access_token_ttl
        assert body["scope"].split() == ["openid", "offline_access", idp.api_scope()]
        assert body["refresh_token"] and body["id_token"]

    claims = dict(jwt.decode(body["access_token"], idp.key).claims)
    header = jwt.decode(body["access_token"], idp.key).header
    assert header["alg"] == "RS256" and header["kid"] == idp.kid
    assert claims["iss"] == idp.issuer and claims["aud"] == "api://herald"
    assert claims["azp"] == CLIENT
    assert claims["scp"] == "Notifications.ReadWrite.CreatedByApp"
    assert claims["oid"] == claims["sub"] == "ada"
    assert claims["exp"] - claims["iat"] == idp.access_token_ttl
    assert claims["nbf"] == claims["iat"] and claims["jti"]
    id_claims = dict(jwt.decode(body["id_token"], idp.key).claims)
    assert id_claims["aud"] == CLIENT and id_claims["nonce"] == "n-0S6_WzA2Mj"

    for via in ("discovery", "jwks"):
        v = verifier(idp, via=via)
        try:
            principal = await v.verify(body["access_token"])
        finally:
            await v.aclose()
        assert principal.user_id == "ada" and principal.client_id == CLIENT
        assert not principal.app_only
        require_permission(principal)

    (issued,) = idp.issued()
    assert issued.grant_type == "authorization_code" and issued.origin == HERALD
    assert idp.refused() == []


async def test_refresh_rotates_and_the_new_token_is_accepted(idp: IdpStandIn) -> None:
    with httpx.Client(timeout=10, follow_redirects=False) as http:
        first = redeem(http, idp, sign_in(http, idp, "bo")).json()
        second = refresh(http, idp, first["refresh_token"], origin=HERALD)
        assert second.status_code == 200, second.text
        assert second.headers["cache-control"] == "no-store"
        renewed = second.json()
        assert renewed["refresh_token"] != first["refresh_token"]
        assert renewed["access_token"] != first["access_token"]
        # The rotated one renews again; a narrower scope may be asked for.
        narrower = refresh(http, idp, renewed["refresh_token"], scope="openid offline_access")
        assert narrower.status_code == 200, narrower.text
        assert "scp" not in dict(jwt.decode(narrower.json()["access_token"], idp.key).claims)
        wider = refresh(http, idp, narrower.json()["refresh_token"], scope=scope_of(idp, "email"))
        oauth_error(wider, "invalid_scope")
    v = verifier(idp)
    try:
        principal = await v.verify(renewed["access_token"])
        assert principal.user_id == "bo" and principal.client_id == CLIENT
        require_permission(principal)
        # Without the API's scope the token names the user but does not grant the permission.
        no_scope = await v.verify(narrower.json()["access_token"])
        with pytest.raises(AccessDenied):
            require_permission(no_scope)
    finally:
        await v.aclose()
    grants = [i.grant_type for i in idp.issued()]
    assert grants == ["authorization_code", "refresh_token", "refresh_token"]


async def test_access_tokens_expire_after_the_configured_ttl(idp: IdpStandIn) -> None:
    idp.access_token_ttl = 6
    with httpx.Client(timeout=10, follow_redirects=False) as http:
        body = redeem(http, idp, sign_in(http, idp)).json()
    assert body["expires_in"] == 6
    later = TokenVerifier(
        local=None,
        issuers=[IssuerConfig(idp.issuer, "api://herald", jwks_url=idp.jwks_url)],
        leeway=0,
        clock=lambda: time.time() + 7,
    )
    try:
        with pytest.raises(Unauthenticated, match="expired"):
            await later.verify(body["access_token"])
    finally:
        await later.aclose()


def test_without_offline_access_there_is_no_refresh_token(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    body = redeem(http, idp, sign_in(http, idp, scope=scope_of(idp))).json()
    assert "refresh_token" not in body and body["access_token"]
    oauth_error(refresh(http, idp, "made-up"), "invalid_grant")


# -- PKCE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verifier_value", "why"),
    [
        (None, "missing"),
        ("x" * 43, "does not match"),
        ("short", "43-128"),
    ],
)
def test_a_wrong_or_missing_code_verifier_is_refused(
    idp: IdpStandIn, http: httpx.Client, verifier_value: str | None, why: str
) -> None:
    flow = sign_in(http, idp)
    assert why in oauth_error(
        redeem(http, idp, flow, code_verifier=verifier_value), "invalid_grant"
    )
    # The failed attempt consumed the code: the right verifier no longer helps.
    oauth_error(redeem(http, idp, flow), "invalid_grant")
    assert idp.issued() == []


@pytest.mark.parametrize(
    ("params", "error", "why"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request", "'plain' is not supported"),
        ({"code_challenge_method": None}, "invalid_request", "only S256"),
        ({"code_challenge": None}, "invalid_request", "PKCE"),
        ({"code_challenge": "too-short"}, "invalid_request", "43 base64url"),
        ({"response_type": "token"}, "unsupported_response_type", "code"),
        ({"response_type": None}, "invalid_request", "response_type"),
        ({"scope": "offline_access"}, "invalid_scope", "openid"),
        ({"scope": "openid admin"}, "invalid_scope", "'admin'"),
        ({"response_mode": "fragment"}, "invalid_request", "query"),
        ({"prompt": "none"}, "login_required", "not signed in"),
    ],
)
def test_a_bad_authorization_request_goes_back_with_an_error(
    idp: IdpStandIn,
    http: httpx.Client,
    params: dict[str, str | None],
    error: str,
    why: str,
) -> None:
    target, query = redirected_to(authorize(http, idp, state="xyz", **params))
    assert target == REDIRECT
    assert query["error"] == [error] and query["state"] == ["xyz"]
    assert why in query["error_description"][0]
    assert "code" not in query
    (refusal,) = idp.refused("authorize")
    assert refusal.error == error
    assert idp.authorizations() == []


def test_the_challenge_is_checked_again_when_the_form_is_submitted(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    form = login_form(authorize(http, idp))
    form.fields["code_challenge_method"] = "plain"
    _, query = redirected_to(submit(http, idp, form, "login"))
    assert query["error"] == ["invalid_request"] and "code" not in query


def test_the_pkce_computation_matches_rfc_7636() -> None:
    # RFC 7636 appendix B.
    verifier_b = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256(verifier_b) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


# -- redirect_uri and client --------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"redirect_uri": "http://127.0.0.1:9/elsewhere/"},
        {"redirect_uri": REDIRECT + "?x=1"},
        {"redirect_uri": REDIRECT.rstrip("/")},
        {"redirect_uri": None},
        {"client_id": "unknown"},
        {"client_id": None},
        # A bad redirect_uri wins over every other error: still no redirect.
        {"redirect_uri": "http://evil.example/", "code_challenge_method": "plain"},
    ],
)
def test_an_unregistered_redirect_uri_or_client_gets_an_error_page_never_a_redirect(
    idp: IdpStandIn, http: httpx.Client, params: dict[str, str | None]
) -> None:
    response = authorize(http, idp, **params)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "Sign-in error" in response.text
    (refusal,) = idp.refused("authorize")
    assert refusal.error == "error_page"


def test_a_redirect_uri_of_another_client_is_not_accepted(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    response = authorize(http, idp, redirect_uri="http://127.0.0.1:9/other/")
    assert response.status_code == 400 and "location" not in response.headers


def test_a_redirect_uri_differing_at_the_token_endpoint_is_refused(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    flow = sign_in(http, idp)
    why = oauth_error(redeem(http, idp, flow, redirect_uri=REDIRECT + "x"), "invalid_grant")
    assert "redirect_uri" in why
    flow = sign_in(http, idp)
    assert "redirect_uri" in oauth_error(
        redeem(http, idp, flow, redirect_uri=None), "invalid_request"
    )


def test_a_code_of_another_client_is_refused(idp: IdpStandIn, http: httpx.Client) -> None:
    flow = sign_in(http, idp)
    assert "another client" in oauth_error(
        redeem(http, idp, flow, client_id=OTHER), "invalid_grant"
    )
    flow = sign_in(http, idp)
    oauth_error(redeem(http, idp, flow, client_id="nobody"), "invalid_client", 401)
    oauth_error(redeem(http, idp, flow, client_id=None), "invalid_client", 401)


def test_a_refresh_token_of_another_client_is_refused(idp: IdpStandIn, http: httpx.Client) -> None:
    body = redeem(http, idp, sign_in(http, idp)).json()
    why = oauth_error(refresh(http, idp, body["refresh_token"], client_id=OTHER), "invalid_grant")
    assert "another client" in why


def test_public_clients_do_not_authenticate(idp: IdpStandIn, http: httpx.Client) -> None:
    flow = sign_in(http, idp)
    oauth_error(redeem(http, idp, flow, client_secret="s3cret"), "invalid_client", 401)


# -- single use and expiry ----------------------------------------------------------------------


def test_a_reused_code_is_refused_and_revokes_what_it_issued(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    flow = sign_in(http, idp)
    first = redeem(http, idp, flow)
    assert first.status_code == 200
    assert "already used" in oauth_error(redeem(http, idp, flow), "invalid_grant")
    # RFC 6749 §4.1.2: what the code issued is revoked.
    why = oauth_error(refresh(http, idp, first.json()["refresh_token"]), "invalid_grant")
    assert "revoked" in why


def test_an_expired_code_is_refused(idp: IdpStandIn, http: httpx.Client) -> None:
    flow = sign_in(http, idp)
    idp.advance(idp.code_ttl + 1)
    assert "expired" in oauth_error(redeem(http, idp, flow), "invalid_grant")


def test_an_unknown_code_is_refused(idp: IdpStandIn, http: httpx.Client) -> None:
    flow = sign_in(http, idp)
    flow.code = "not-a-code"
    assert "unknown" in oauth_error(redeem(http, idp, flow), "invalid_grant")


def test_a_reused_refresh_token_is_refused_and_ends_the_session(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    body = redeem(http, idp, sign_in(http, idp)).json()
    rotated = refresh(http, idp, body["refresh_token"]).json()
    assert "already used" in oauth_error(refresh(http, idp, body["refresh_token"]), "invalid_grant")
    # Reuse means a leaked token: the whole sign-in is revoked, the rotated token too.
    assert "revoked" in oauth_error(refresh(http, idp, rotated["refresh_token"]), "invalid_grant")
    assert [r.error for r in idp.refused("token")] == ["invalid_grant", "invalid_grant"]


def test_an_expired_refresh_token_is_refused(idp: IdpStandIn, http: httpx.Client) -> None:
    body = redeem(http, idp, sign_in(http, idp)).json()
    idp.advance(idp.refresh_token_ttl + 1)
    assert "expired" in oauth_error(refresh(http, idp, body["refresh_token"]), "invalid_grant")


# -- the token endpoint's request format --------------------------------------------------------


def test_malformed_token_requests_are_refused(idp: IdpStandIn, http: httpx.Client) -> None:
    flow = sign_in(http, idp)
    as_json = http.post(idp.token_endpoint, json={"grant_type": "authorization_code"})
    oauth_error(as_json, "invalid_request")
    repeated = http.post(
        idp.token_endpoint,
        content=f"grant_type=authorization_code&client_id={CLIENT}&code=a&code=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert "more than once" in oauth_error(repeated, "invalid_request")
    oauth_error(token(http, idp, grant_type="password", client_id=CLIENT), "unsupported_grant_type")
    oauth_error(token(http, idp, client_id=CLIENT), "invalid_request")
    oauth_error(redeem(http, idp, flow, code=None), "invalid_request")
    # None of that touched the code.
    assert redeem(http, idp, flow).status_code == 200
    assert http.get(idp.token_endpoint).status_code == 405


# -- the login form -----------------------------------------------------------------------------


def test_cancel_sends_access_denied_back(idp: IdpStandIn, http: httpx.Client) -> None:
    form = login_form(authorize(http, idp, state="keep-me"))
    target, query = redirected_to(submit(http, idp, form, "cancel"))
    assert target == REDIRECT
    assert query["error"] == ["access_denied"] and query["state"] == ["keep-me"]
    assert "code" not in query


def test_an_empty_or_unknown_username_shows_the_form_again(http: httpx.Client) -> None:
    with IdpStandIn(clients={CLIENT: [REDIRECT]}, users=["ada"]) as idp:
        form = login_form(authorize(http, idp))
        for user, why in (("", "Enter your username"), ("mallory", "Unknown username")):
            again = submit(http, idp, form, "login", user)
            assert again.status_code == 200 and why in again.text
            assert 'role="alert"' in again.text
        _, query = redirected_to(submit(http, idp, form, "login", "ada"))
        assert query["code"]


def test_a_tampered_redirect_uri_in_the_form_gets_an_error_page(
    idp: IdpStandIn, http: httpx.Client
) -> None:
    form = login_form(authorize(http, idp))
    form.fields["redirect_uri"] = "http://evil.example/inbox/"
    response = submit(http, idp, form, "login")
    assert response.status_code == 400 and "location" not in response.headers


# -- CORS ---------------------------------------------------------------------------------------


def test_cors_only_for_the_allowed_origin(idp: IdpStandIn, http: httpx.Client) -> None:
    for url in (idp.discovery_url, idp.jwks_url):
        ours = http.get(url, headers={"Origin": HERALD})
        assert ours.headers["access-control-allow-origin"] == HERALD
        theirs = http.get(url, headers={"Origin": FOREIGN})
        assert theirs.status_code == 200
        assert "access-control-allow-origin" not in theirs.headers

    def preflight(origin: str, headers: str = "content-type") -> httpx.Response:
        return http.options(
            idp.token_endpoint,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": headers,
            },
        )

    ok = preflight(HERALD)
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == HERALD
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "content-type" in ok.headers["access-control-allow-headers"]
    for refused in (preflight(FOREIGN), preflight(HERALD, "x-custom")):
        assert refused.status_code == 403
        assert "access-control-allow-origin" not in refused.headers

    flow = sign_in(http, idp)
    foreign = redeem(http, idp, flow, origin=FOREIGN)
    assert "cross-origin" in oauth_error(foreign, "invalid_request")
    assert "access-control-allow-origin" not in foreign.headers
    # The foreign attempt did not consume the code; errors to the allowed origin carry CORS.
    bad = redeem(http, idp, flow, origin=HERALD, code_verifier="y" * 43)
    assert bad.headers["access-control-allow-origin"] == HERALD
    assert "does not match" in oauth_error(bad, "invalid_grant")
    assert [r.endpoint for r in idp.refused()] == ["preflight", "preflight", "token", "token"]
