"""Web sessions of the embedded issuer (docs/inbox.md): `herald signin` links, the sign-in code and
refresh token grants at the token endpoint, `herald app create --client-id`, and the files the
inbox is served from. Real HTTP against a running Herald (SQLite and PostgreSQL)."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner
from joserfc import jws

from herald.auth.issuer import LocalIssuer
from herald.auth.sessions import SIGNIN_GRANT, Sessions
from herald.cli import main
from tests.conftest import RegisteredApp, Server, servers
from tests.test_auth import claims_of

TOKEN = "/oauth2/v2.0/token"
FEED = "/beta/me/notifications"


def signin(server: Server, app: RegisteredApp, user: str, *extra: str) -> str:
    """`herald signin`'s link."""
    port = ["--port", str(server.settings.port)]
    args = ["signin", "--app", app.client_id, "--user", user, *port, *server.cli_args, *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def code_of(link: str) -> str:
    return urlsplit(link).fragment.removeprefix("signin=")


def grant(server: Server, **form: str) -> httpx.Response:
    return httpx.post(server.base_url + TOKEN, data=form, timeout=10)


def redeem(server: Server, app: RegisteredApp, code: str) -> httpx.Response:
    return grant(server, grant_type=SIGNIN_GRANT, code=code, client_id=app.client_id)


def refresh(server: Server, app: RegisteredApp, token: str) -> httpx.Response:
    return grant(server, grant_type="refresh_token", refresh_token=token, client_id=app.client_id)


def feed(server: Server, token: str) -> httpx.Response:
    return httpx.get(
        server.base_url + FEED, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def invalid_grant(response: httpx.Response, words: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_grant"
    assert words in body["error_description"]
    assert response.headers["cache-control"] == "no-store"


def sessions(server: Server, clock: float | None = None) -> Sessions:
    issuer = LocalIssuer.load_or_create(
        server.data, server.settings.issuer_url, server.settings.audience
    )
    return Sessions(issuer, clock=(lambda: clock) if clock is not None else time.time)


def test_a_link_signs_the_user_in_once(server: Server, app: RegisteredApp, user: str) -> None:
    link = signin(server, app, user)
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}" == server.base_url
    assert parts.path == "/inbox/"
    assert parse_qs(parts.query) == {"app": [app.client_id]}
    assert parts.fragment.startswith("signin=")

    response = redeem(server, app, code_of(link))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= server.settings.token_ttl
    session_ttl = server.settings.session_ttl
    # Whole seconds from a whole second, the session's end rounded up: one more at most.
    assert session_ttl - 5 <= body["refresh_token_expires_in"] <= session_ttl + 1
    # The access token is the user's delegated token for the app: it reads the user's feed.
    answer = feed(server, body["access_token"])
    assert answer.status_code == 200, answer.text
    assert f"users('{user}')" in answer.json()["@odata.context"]

    invalid_grant(redeem(server, app, code_of(link)), "already been used")


def test_refresh_renews_until_the_session_ends(
    server: Server, app: RegisteredApp, user: str
) -> None:
    first = redeem(server, app, code_of(signin(server, app, user))).json()
    second = refresh(server, app, first["refresh_token"])
    assert second.status_code == 200, second.text
    renewed = second.json()
    assert renewed["refresh_token"] != first["refresh_token"]
    # The session end is fixed at sign-in: a refresh does not extend it.
    assert renewed["refresh_token_expires_in"] <= first["refresh_token_expires_in"]
    assert feed(server, renewed["access_token"]).status_code == 200
    # The old refresh token of the same session still works (stateless; docs/inbox.md).
    assert refresh(server, app, first["refresh_token"]).status_code == 200


def test_a_session_ends_at_session_ttl(tmp_path: Path, user: str) -> None:
    for server in servers("sqlite", tmp_path, session_ttl=2, token_ttl=3600):
        app = server.register()
        code = code_of(signin(server, app, user))
        started = time.time()
        body = redeem(server, app, code).json()
        # The session lasts no less than session_ttl, though token times are whole seconds.
        end = claims_of(body["refresh_token"])["exp"]
        assert started + 2 <= end <= started + 3
        # The access token never outlives the session.
        assert claims_of(body["access_token"])["exp"] <= end
        assert body["expires_in"] <= body["refresh_token_expires_in"] <= 3
        time.sleep(max(0.0, end - 0.3 - time.time()))
        renewed = refresh(server, app, body["refresh_token"])
        assert renewed.status_code == 200, renewed.text
        assert claims_of(renewed.json()["access_token"])["exp"] <= end
        time.sleep(max(0.0, end + 0.05 - time.time()))
        invalid_grant(refresh(server, app, body["refresh_token"]), "expired")


def test_codes_and_refresh_tokens_are_not_interchangeable(
    server: Server, app: RegisteredApp, user: str
) -> None:
    code = code_of(signin(server, app, user))
    # A sign-in code is neither an access token nor a refresh token.
    assert feed(server, code).status_code == 401
    invalid_grant(refresh(server, app, code), "not valid")
    body = redeem(server, app, code).json()
    # A refresh token is not an access token, an access token not a refresh token.
    assert feed(server, body["refresh_token"]).status_code == 401
    invalid_grant(refresh(server, app, body["access_token"]), "not valid")
    invalid_grant(redeem(server, app, body["refresh_token"]), "not valid")
    # Each carries a JWT type of its own (RFC 8725 §3.11).
    assert jwt_type(code) == "herald-signin+jwt"
    assert jwt_type(body["refresh_token"]) == "herald-refresh+jwt"
    assert jwt_type(body["access_token"]) == "JWT"


def jwt_type(token: str) -> str:
    return str(jws.extract_compact(token.encode()).headers()["typ"])


def test_tokens_are_bound_to_their_client(server: Server, user: str) -> None:
    app, other = server.register(), server.register()
    code = code_of(signin(server, app, user))
    invalid_grant(redeem(server, other, code), "another client")
    # The refused attempt did not use the code up.
    body = redeem(server, app, code).json()
    invalid_grant(refresh(server, other, body["refresh_token"]), "another client")


def test_expired_and_forged_codes_are_refused(
    server: Server, app: RegisteredApp, user: str
) -> None:
    old = sessions(server, clock=time.time() - 3600).signin_code(app.client_id, user, ttl=600)
    invalid_grant(redeem(server, app, old), "expired")
    code = code_of(signin(server, app, user))
    head, payload, signature = code.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    invalid_grant(redeem(server, app, tampered), "not valid")
    invalid_grant(redeem(server, app, "not-a-jwt"), "not valid")
    # Signed by another issuer's key.
    stranger = LocalIssuer(
        LocalIssuer.load_or_create(
            server.data / "elsewhere", server.settings.issuer_url, server.settings.audience
        ).key,
        issuer_url=server.settings.issuer_url,
        audience=server.settings.audience,
    )
    forged = Sessions(stranger).signin_code(app.client_id, user)
    invalid_grant(redeem(server, app, forged), "not valid")


def test_a_session_of_an_unregistered_app_is_refused(server: Server, user: str) -> None:
    code = sessions(server).signin_code("never-registered", user)
    response = grant(server, grant_type=SIGNIN_GRANT, code=code, client_id="never-registered")
    invalid_grant(response, "no longer registered")


@pytest.mark.parametrize(
    ("form", "error", "words"),
    [
        ({"grant_type": SIGNIN_GRANT, "code": "x"}, "invalid_request", "client_id"),
        ({"grant_type": SIGNIN_GRANT, "client_id": "x"}, "invalid_request", "code is required"),
        ({"grant_type": "refresh_token", "client_id": "x"}, "invalid_request", "refresh_token"),
        ({"grant_type": "password", "client_id": "x"}, "unsupported_grant_type", "refresh_token"),
    ],
)
def test_bad_session_requests(server: Server, form: dict[str, str], error: str, words: str) -> None:
    response = grant(server, **form)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert words in response.json()["error_description"]


def test_discovery_lists_the_session_grants(server: Server) -> None:
    doc = httpx.get(server.base_url + "/.well-known/openid-configuration").json()
    assert set(doc["grant_types_supported"]) == {
        "client_credentials",
        "refresh_token",
        SIGNIN_GRANT,
    }


def test_signin_cli_refuses_what_it_cannot_sign(server: Server, app: RegisteredApp) -> None:
    runner = CliRunner()
    unknown = runner.invoke(main, ["signin", "--app", "nope", "--user", "u", *server.cli_args])
    assert unknown.exit_code != 0
    assert "nope" in unknown.output
    bad_user = runner.invoke(
        main, ["signin", "--app", app.client_id, "--user", "a\nb", *server.cli_args]
    )
    assert bad_user.exit_code != 0
    assert "--user" in bad_user.output
    too_long = runner.invoke(
        main, ["signin", "--app", app.client_id, "--user", "u", "--ttl", "999999", *server.cli_args]
    )
    assert too_long.exit_code != 0


def test_signin_cli_needs_the_embedded_issuer(tmp_path: Path) -> None:
    config = tmp_path / "herald.toml"
    issuers = '[[issuers]]\nissuer = "https://idp.example"\naudience = "x"\n'
    config.write_text(f'local_issuer = false\n{issuers}jwks_url = "https://idp.example/k"\n')
    result = CliRunner().invoke(
        main,
        ["signin", "--app", "a", "--user", "u", "--config", str(config), "--data", str(tmp_path)],
    )
    assert result.exit_code != 0
    assert "embedded issuer is disabled" in result.output


def test_app_create_takes_an_external_client_id(server: Server) -> None:
    runner = CliRunner()
    client_id = f"inbox-{time.time_ns()}"
    args = ["app", "create", "--host-name", f"{client_id}.example.com", *server.cli_args]
    made = runner.invoke(main, [*args, "--client-id", client_id])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["clientId"] == client_id
    again = runner.invoke(
        main,
        ["app", "create", "--host-name", "other.example.org", "--client-id", client_id]
        + server.cli_args,
    )
    assert again.exit_code != 0
    assert "exists" in again.output
    for bad in ("with space", "", "-leading", "x" * 129, "a\u00e9"):
        refused = runner.invoke(main, [*args, "--client-id", bad])
        assert refused.exit_code != 0, bad
        assert "--client-id" in refused.output


# --- the inbox's files ---------------------------------------------------------------------------


def get(server: Server, path: str, **headers: str) -> httpx.Response:
    return httpx.get(server.base_url + path, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("name", "media"),
    [
        ("", "text/html"),
        ("index.html", "text/html"),
        ("herald.js", "text/javascript"),
        ("inbox.js", "text/javascript"),
        ("sw.js", "text/javascript"),
        ("inbox.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
        ("config.json", "application/json"),
    ],
)
def test_inbox_files_are_served_with_a_strict_policy(server: Server, name: str, media: str) -> None:
    response = get(server, "/inbox/" + name)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(media)
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"
    etag = response.headers["etag"]
    assert get(server, "/inbox/" + name, **{"If-None-Match": etag}).status_code == 304
    # Compressed for browsers (httpx asks for gzip and decodes it), plain for who doesn't ask.
    assert response.headers["content-encoding"] == "gzip"
    plain = get(server, "/inbox/" + name, **{"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.content == response.content


def raw_get(server: Server, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (httpx would normalise dot segments away)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.settings.port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_inbox_serves_only_its_own_files(server: Server) -> None:
    # The handler looks names up among the files it loaded; nothing reaches the file system.
    for path in (
        "/inbox/nope.js",
        "/inbox/../pyproject.toml",
        "/inbox/%2e%2e/settings.py",
        "/inbox/..%2fsettings.py",
        "/inbox/__init__.py",
        "/inbox/%2e%2e%2fapi%2finbox.py",
    ):
        status, body = raw_get(server, path)
        assert status == 404, path
        assert json.loads(body)["error"]["code"] == "itemNotFound", path


def test_inbox_without_slash_redirects_with_its_query(server: Server) -> None:
    response = httpx.get(server.base_url + "/inbox?activate=x", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"].endswith("/inbox/?activate=x")


def config_json(tmp_path: Path, **overrides: Any) -> tuple[dict[str, Any], str]:
    tmp_path.mkdir()
    for server in servers("sqlite", tmp_path, **overrides):
        response = get(server, "/inbox/config.json")
        return response.json(), response.headers["content-security-policy"]
    raise AssertionError("no server")


def test_inbox_config_says_how_to_sign_in(tmp_path: Path) -> None:
    config, policy = config_json(tmp_path / "link")
    assert config == {"signIn": "link"}
    assert "connect-src 'self';" in policy

    oidc = {
        "inbox_issuer": "https://login.example.com/realms/main",
        "inbox_client_id": "herald-inbox",
        "inbox_scope": "openid offline_access api://herald/Notifications.ReadWrite.CreatedByApp",
    }
    config, policy = config_json(tmp_path / "oidc", **oidc)
    assert config == {
        "signIn": "oidc",
        "issuer": oidc["inbox_issuer"],
        "clientId": "herald-inbox",
        "scope": oidc["inbox_scope"],
    }
    # The page may talk to the IdP (discovery, token endpoint), and nowhere else.
    assert "connect-src 'self' https://login.example.com;" in policy
    assert "form-action 'self';" in policy
    elsewhere = {**oidc, "inbox_origins": "https://oauth2.idp.example https://b.example:8443"}
    _, policy = config_json(tmp_path / "elsewhere", **elsewhere)
    assert (
        "connect-src 'self' https://login.example.com https://oauth2.idp.example "
        "https://b.example:8443;" in policy
    )

    issuers = ({"issuer": "https://idp.example", "audience": "x", "jwks_url": "https://k"},)
    config, _ = config_json(tmp_path / "none", local_issuer=False, issuers=issuers)
    assert config == {"signIn": "none"}
