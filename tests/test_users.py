"""Users addressed as Graph addresses them, against a running Herald (SQLite and PostgreSQL):
GUID ids in any case are one user; `/users/{userPrincipalName}` resolves, to the user a
delegated token or `herald user set` named; and no spelling crosses from one user to another."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from click.testing import CliRunner
from joserfc import jwt

from herald.auth.issuer import LocalIssuer
from herald.cli import main
from tests.conftest import RegisteredApp, Server, servers
from tests.devices import assert_graph_error, notification_body, subscription_body

FEED = "/beta/me/notifications"


def guid() -> str:
    return str(uuid.uuid4())


def token(server: Server, app: RegisteredApp, user: str | None, **claims: str) -> str:
    """A token of the embedded issuer: delegated for `user` (as given, any case), else
    app-only; with extra claims such as `upn` or `preferred_username`."""
    issuer = LocalIssuer.load_or_create(
        server.data, server.settings.issuer_url, server.settings.audience
    )
    now = int(time.time())
    body: dict[str, object] = {
        "iss": issuer.issuer,
        "aud": issuer.audience,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "azp": app.client_id,
    }
    if user is None:
        body |= {"roles": ["Notifications.ReadWrite.CreatedByApp"], "idtyp": "app"}
    else:
        body |= {"scp": "Notifications.ReadWrite.CreatedByApp", "oid": user, "sub": user}
    body |= claims
    header = {"alg": "RS256", "typ": "JWT", "kid": issuer.kid}
    return jwt.encode(header, body, issuer.key, algorithms=["RS256"])


def client(server: Server, bearer: str) -> httpx.Client:
    return server.client(bearer)


def post_to(c: httpx.Client, app: RegisteredApp, path: str) -> httpx.Response:
    return c.post(path, json=notification_body(app.host_name))


def test_guid_user_ids_are_case_insensitive(server: Server, app: RegisteredApp) -> None:
    alice = guid()
    upper, lower = alice.upper(), alice.lower()
    backend = client(server, token(server, app, None))
    for spelling in (upper, lower, alice[:8].upper() + alice[8:]):
        r = post_to(backend, app, f"/beta/users/{spelling}/notifications")
        assert r.status_code == 201, r.text
        assert f"/users/{lower}/notifications/" in r.headers["location"]
    for device_id in (upper, lower):
        device = client(server, token(server, app, device_id))
        assert len(device.get(FEED).json()["value"]) == 3
        assert device.get(f"/beta/users/{upper}/notifications").status_code == 200
    # ids that are not GUIDs stay exact: two users
    assert post_to(backend, app, "/beta/users/Carol/notifications").status_code == 201
    assert client(server, token(server, app, "carol")).get(FEED).json()["value"] == []


def test_principal_names_resolve_to_the_user_a_token_named(
    server: Server, app: RegisteredApp
) -> None:
    alice, domain = guid(), f"{uuid.uuid4().hex[:8]}.example"
    upn = f"Alice@{domain}"
    device = client(server, token(server, app, alice, preferred_username=upn))
    assert device.get(FEED).status_code == 200  # Herald learns the name from the token
    backend = client(server, token(server, app, None))
    for spelling in (upn, upn.lower(), upn.upper()):
        r = post_to(backend, app, f"/beta/users/{spelling}/notifications")
        assert r.status_code == 201, r.text
        assert f"/users/{alice}/notifications/" in r.headers["location"]
    assert len(device.get(FEED).json()["value"]) == 3
    assert device.get(f"/beta/users/{upn.upper()}/notifications").status_code == 200
    # a name nobody was given is a plain user id, as before: not alice's feed
    assert post_to(backend, app, f"/beta/users/bob@{domain}/notifications").status_code == 201
    assert len(device.get(FEED).json()["value"]) == 3


def test_no_spelling_crosses_users(server: Server, app: RegisteredApp) -> None:
    alice, mallory, domain = guid(), guid(), f"{uuid.uuid4().hex[:8]}.example"
    upn = f"alice@{domain}"
    alice_device = client(server, token(server, app, alice, upn=upn))
    assert alice_device.get(FEED).status_code == 200
    secret = post_to(alice_device, app, FEED).json()["id"]
    mallory_token = token(server, app, mallory.upper(), preferred_username=f"mallory@{domain}")
    m = client(server, mallory_token)
    for path_user in (upn, upn.upper(), alice.upper(), alice, f"ALICE@{domain.upper()}"):
        for r in (
            m.get(f"/beta/users/{path_user}/notifications"),
            m.get(f"/beta/users/{path_user}/notifications/{secret}"),
            post_to(m, app, f"/beta/users/{path_user}/notifications"),
        ):
            assert_graph_error(r, 403, "accessDenied")
    # an app server naming alice by UPN with a device id (X-UNS-ID) of mallory's: refused
    mallory_sub = m.post(
        "/beta/me/notificationSubscriptions", json=subscription_body(app.host_name)
    ).json()["id"]
    backend = client(server, token(server, app, None))
    r = backend.post(
        f"/beta/users/{upn}/notifications",
        json=notification_body(app.host_name),
        headers={"X-UNS-ID": mallory_sub},
    )
    assert_graph_error(r, 403, "accessDenied")
    assert [n["id"] for n in alice_device.get(FEED).json()["value"]] == [secret]
    assert m.get(FEED).json()["value"] == []


def test_a_learned_name_is_not_taken_over_by_another_users_token(
    server: Server, app: RegisteredApp
) -> None:
    """`preferred_username` may be self-chosen: mallory setting hers to alice's name must not
    route what app servers send to alice's name into mallory's feed."""
    alice, mallory, domain = guid(), guid(), f"{uuid.uuid4().hex[:8]}.example"
    upn = f"alice@{domain}"
    alice_device = client(server, token(server, app, alice, upn=upn))
    assert alice_device.get(FEED).status_code == 200  # alice's name is learned
    m = client(server, token(server, app, mallory, preferred_username=upn.upper()))
    assert m.get(FEED).status_code == 200
    backend = client(server, token(server, app, None))
    r = post_to(backend, app, f"/beta/users/{upn}/notifications")
    assert r.status_code == 201, r.text
    assert f"/users/{alice}/notifications/" in r.headers["location"]
    assert m.get(FEED).json()["value"] == []
    assert len(alice_device.get(FEED).json()["value"]) == 1


def test_a_pinned_name_is_not_moved_by_tokens(server: Server, app: RegisteredApp) -> None:
    alice, mallory, domain = guid(), guid(), f"{uuid.uuid4().hex[:8]}.example"
    upn = f"alice@{domain}"
    result = CliRunner().invoke(
        main, ["user", "set", "--upn", upn.upper(), "--user", alice.upper(), *server.cli_args]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"upn": upn, "userId": alice, "pinned": True}
    # a token (of another user) claiming that name does not take it over
    m = client(server, token(server, app, mallory, upn=upn))
    assert m.get(FEED).status_code == 200
    backend = client(server, token(server, app, None))
    r = post_to(backend, app, f"/beta/users/{upn}/notifications")
    assert f"/users/{alice}/notifications/" in r.headers["location"]
    assert m.get(FEED).json()["value"] == []
    listed = CliRunner().invoke(main, ["user", "list", *server.cli_args])
    assert {"upn": upn, "userId": alice, "pinned": True} in json.loads(listed.stdout)
    removed = CliRunner().invoke(main, ["user", "remove", "--upn", upn, *server.cli_args])
    assert removed.exit_code == 0, removed.output


@pytest.fixture(scope="module")
def unlearning(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from servers(
        "sqlite", Path(tmp_path_factory.mktemp("unlearning")), learn_user_names=False
    )


def test_learning_names_from_tokens_can_be_turned_off(unlearning: Server) -> None:
    server = unlearning
    app = server.register()
    alice, upn = guid(), f"alice@{uuid.uuid4().hex[:8]}.example"
    assert client(server, token(server, app, alice, upn=upn)).get(FEED).status_code == 200
    backend = client(server, token(server, app, None))
    r = post_to(backend, app, f"/beta/users/{upn}/notifications")
    assert r.status_code == 201
    assert f"/users/{upn}/notifications/" in unquote(r.headers["location"])
