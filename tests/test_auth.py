"""herald.auth: credentials, the embedded issuer, token verification, JWKS and the token endpoint.

External issuers are served by a real HTTP server on 127.0.0.1 (discovery + JWKS of keys generated
here); the token endpoint runs in a minimal Starlette app over httpx's ASGI transport, with an
in-memory store double that implements only `get_app`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import pathlib
import socket
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from starlette.applications import Starlette

from herald.api import token as token_api
from herald.auth import (
    SCOPE,
    IssuerConfig,
    LocalIssuer,
    Principal,
    TokenVerifier,
    hash_secret,
    new_client_id,
    new_client_secret,
    require_permission,
    verify_secret,
)
from herald.auth import issuer as issuer_module
from herald.errors import AccessDenied, Unauthenticated
from herald.limits import Limiter
from herald.model import App

ISS = "http://herald.test"
AUD = "api://herald"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, auto_kid=True)


@pytest.fixture(scope="module")
def local(rsa_key: RSAKey) -> LocalIssuer:
    return LocalIssuer(rsa_key, issuer_url=ISS, audience=AUD)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return result


def sign(key: Any, claims: dict[str, Any], *, alg: str = "RS256", kid: str | None = "") -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    kid = key.kid if kid == "" else kid
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, claims, key, algorithms=[alg])


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "azp": "client-1",
        "oid": "user-1",
        "sub": "user-1",
        "scp": SCOPE,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def verifier(local: LocalIssuer | None, **kw: Any) -> TokenVerifier:
    return TokenVerifier(local=local, issuers=kw.pop("issuers", ()), **kw)


async def rejected(v: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        await v.verify(token)
    return info.value.message


# --- credentials -----------------------------------------------------------------------------


def test_client_id_is_a_guid() -> None:
    value = new_client_id()
    assert str(uuid.UUID(value)) == value


def test_client_secret_is_long_and_url_safe() -> None:
    secret = new_client_secret()
    assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) >= 32
    assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert new_client_secret() != secret


def test_secret_hash_round_trip() -> None:
    secret = new_client_secret()
    hashed = hash_secret(secret)
    assert hashed.startswith("scrypt$n=16384,r=8,p=1$")
    assert secret not in hashed
    assert hash_secret(secret) != hashed  # salted
    assert verify_secret(secret, hashed)
    assert not verify_secret(secret + "x", hashed)
    assert not verify_secret("", hashed)


@pytest.mark.parametrize(
    "hashed",
    ["", "plain", "bcrypt$x$y$z", "scrypt$n=3,r=8,p=1$AAAA$AAAA", "scrypt$n=16384$AA$AA"]
    + ["scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "scrypt$n=x,r=8,p=1$A$A"],
)
def test_malformed_hash_never_matches(hashed: str) -> None:
    assert not verify_secret("anything", hashed)


# --- the embedded issuer ---------------------------------------------------------------------


def test_key_file_is_private_and_reused(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    first = LocalIssuer.load_or_create(data, ISS, AUD)
    path = data / issuer_module.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = LocalIssuer.load_or_create(data, ISS, AUD)
    assert second.kid == first.kid
    assert second.jwks() == first.jwks()
    assert sorted(p.name for p in data.iterdir()) == [issuer_module.KEY_FILE]  # no temp files


def test_concurrent_first_start_agrees_on_one_key(tmp_path: pathlib.Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        results.append(LocalIssuer.load_or_create(tmp_path, ISS, AUD).kid)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [issuer_module.KEY_FILE]


def test_jwks_has_no_private_parts(local: LocalIssuer) -> None:
    (key,) = local.jwks()["keys"]
    assert key["kid"] == local.kid and key["alg"] == "RS256" and key["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()


def test_minted_claims(local: LocalIssuer) -> None:
    delegated = local.mint(client_id="app", user_id="alice", ttl_seconds=120)
    c = claims_of(delegated)
    assert c["scp"] == SCOPE and c["oid"] == c["sub"] == "alice"
    assert c["azp"] == c["appid"] == "app" and c["iss"] == ISS and c["aud"] == AUD
    assert c["exp"] - c["iat"] == 120 and c["nbf"] == c["iat"] and "roles" not in c
    app_only = claims_of(local.mint(client_id="app", user_id=None, roles=[SCOPE]))
    assert app_only["roles"] == [SCOPE] and app_only["idtyp"] == "app" and "scp" not in app_only
    assert "oid" not in app_only
    assert claims_of(local.mint(client_id="app", user_id=None))["roles"] == [SCOPE]  # default
    assert claims_of(local.mint(client_id="app", user_id=None, roles=()))["roles"] == []
    header = json.loads(base64.urlsafe_b64decode(delegated.split(".")[0] + "=="))
    assert header["kid"] == local.kid and header["alg"] == "RS256"
    assert claims_of(local.mint(client_id="a", user_id="u"))["jti"] != c["jti"]


# --- verification with the local issuer ------------------------------------------------------


async def test_minted_tokens_verify(local: LocalIssuer) -> None:
    v = verifier(local)
    p = await v.verify(local.mint(client_id="app", user_id="alice"))
    assert p.user_id == "alice" and p.client_id == "app" and not p.app_only
    assert p.scopes == {SCOPE} and p.roles == frozenset()
    require_permission(p)
    a = await v.verify(local.mint(client_id="app", user_id=None, roles=[SCOPE]))
    assert a.app_only and a.user_id is None and a.roles == {SCOPE} and a.client_id == "app"
    v.require_permission(a)


async def test_audience_list_and_small_clock_skew_accepted(local: LocalIssuer) -> None:
    now = int(time.time())
    token = sign(local.key, claims(aud=["other", AUD], nbf=now + 30, iat=now + 30))
    assert (await verifier(local).verify(token)).user_id == "user-1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": int(time.time()) - 120}, "token expired"),
        ({"nbf": int(time.time()) + 600}, "not yet valid"),
        ({"aud": "api://someone-else"}, "audience mismatch"),
        ({"aud": ["a", "b"]}, "audience mismatch"),
        ({"aud": None}, "audience mismatch"),
        ({"iss": "https://evil.example"}, "unknown issuer"),
        ({"iss": None}, "no iss"),
        ({"exp": None}, "no valid exp"),
        ({"exp": "tomorrow"}, "no valid exp"),
        ({"azp": None}, "no client id"),
        ({"scp": None, "oid": None, "sub": None}, "names no user"),
    ],
)
async def test_claim_rejections(
    local: LocalIssuer, overrides: dict[str, Any], message: str
) -> None:
    token = sign(local.key, claims(**overrides))
    assert message in await rejected(verifier(local), token)


async def test_alg_none_rejected(local: LocalIssuer) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    assert "unsupported token algorithm 'none'" in await rejected(verifier(local), token)


async def test_hs256_with_public_key_as_secret_rejected(local: LocalIssuer) -> None:
    # Forged by hand: joserfc itself refuses to use a public key as an HMAC secret.
    header = b64(json.dumps({"alg": "HS256", "kid": local.kid}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(local.public_key.as_pem(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    assert "unsupported token algorithm 'HS256'" in await rejected(verifier(local), token)


async def test_tampered_payload_rejected(local: LocalIssuer) -> None:
    head, _, sig = local.mint(client_id="app", user_id="alice").split(".")
    forged = b64(json.dumps(claims(oid="mallory", sub="mallory")).encode())
    assert await rejected(verifier(local), f"{head}.{forged}.{sig}") == "bad signature"
    assert await rejected(verifier(local), f"{head}.{forged}.") == "bad signature"


async def test_signed_by_another_key_rejected(local: LocalIssuer) -> None:
    other = RSAKey.generate_key(2048)
    assert "bad signature" in await rejected(verifier(local), sign(other, claims(), kid=local.kid))
    message = await rejected(verifier(local), sign(other, claims(), kid="rotated-away"))
    assert message == "no key with kid 'rotated-away' for issuer 'local'"


async def test_key_of_wrong_type_for_alg_rejected(local: LocalIssuer) -> None:
    ec = ECKey.generate_key("P-256")
    token = sign(ec, claims(), alg="ES256", kid=local.kid)
    assert "cannot verify ES256" in await rejected(verifier(local), token)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "empty token"),
        ("garbage", "malformed token"),
        ("a.b", "malformed token"),
        ("a.b.c.d.e", "malformed token"),
        ("a b.c.d", "malformed token"),
        ("e30.e30.", "unsupported token algorithm None"),
        ("bm90IGpzb24.e30.AAAA", "malformed token"),
        ("W10.e30.AAAA", "malformed token"),  # header is a JSON array
        ("x" * 20000, "too long"),
    ],
)
async def test_garbage_rejected(local: LocalIssuer, token: str, message: str) -> None:
    assert message in await rejected(verifier(local), token)


async def test_crit_header_rejected(local: LocalIssuer) -> None:
    header = b64(json.dumps({"alg": "RS256", "kid": local.kid, "crit": ["x-ext"]}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}.AAAA"
    assert "critical" in await rejected(verifier(local), token)


async def test_token_without_kid_uses_the_single_key(local: LocalIssuer) -> None:
    token = sign(local.key, claims(), kid=None)
    assert (await verifier(local).verify(token)).user_id == "user-1"


# --- identity and permission -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "user", "client"),
    [
        ({"azp": None, "appid": "from-appid"}, "user-1", "from-appid"),
        ({"azp": None, "client_id": "from-client-id"}, "user-1", "from-client-id"),
        ({"oid": None, "sub": "subject"}, "subject", "client-1"),
        # Entra app-only token without the optional idtyp claim: oid == sub (service principal).
        ({"scp": None, "roles": [SCOPE], "oid": "sp", "sub": "sp"}, None, "client-1"),
        ({"scp": None, "roles": [SCOPE], "oid": None, "sub": None}, None, "client-1"),
        ({"scp": None, "idtyp": "app", "sub": "client-1", "oid": None}, None, "client-1"),
        # A user token carrying app roles (assigned to the user) stays delegated.
        ({"roles": [SCOPE], "sub": "pairwise"}, "user-1", "client-1"),
        # RFC 9068 IdPs (Keycloak, Auth0): `scope`, and sub = client id for client credentials.
        ({"scp": None, "scope": f"openid {SCOPE}", "oid": None, "sub": "kc"}, "kc", "client-1"),
        ({"scp": None, "scope": SCOPE, "oid": None, "sub": "client-1"}, None, "client-1"),
        (
            {
                "scp": None,
                "scope": SCOPE,
                "gty": "client-credentials",
                "oid": None,
                "sub": "client-1@clients",
            },
            None,
            "client-1",
        ),
    ],
)
async def test_identity_claims(
    local: LocalIssuer, overrides: dict[str, Any], user: str | None, client: str
) -> None:
    p = await verifier(local).verify(sign(local.key, claims(**overrides)))
    assert (p.user_id, p.client_id) == (user, client)


def principal(user: str | None, scopes: set[str], roles: set[str]) -> Principal:
    return Principal(user, "app", frozenset(scopes), frozenset(roles), int(time.time()) + 60)


def test_permission_delegated_vs_app_only() -> None:
    require_permission(principal("u", {SCOPE, "User.Read"}, set()))
    require_permission(principal(None, set(), {SCOPE}))
    denied = [
        principal("u", {"User.Read"}, set()),
        principal("u", set(), {SCOPE}),  # a role does not grant a delegated call
        principal(None, {SCOPE}, set()),  # a scope does not grant an app-only call
        principal(None, set(), set()),
    ]
    for p in denied:
        with pytest.raises(AccessDenied, match=SCOPE):
            require_permission(p)


@pytest.mark.parametrize(
    "overrides",
    [
        {"scp": None, "scope": f"openid {SCOPE}", "oid": None, "sub": "kc-user"},
        {"scp": None, "scope": SCOPE, "oid": None, "sub": "client-1"},
        {"scp": None, "scope": SCOPE, "gty": "client-credentials", "oid": None, "sub": "x"},
    ],
)
async def test_rfc9068_scope_claim_grants_the_permission(
    local: LocalIssuer, overrides: dict[str, Any]
) -> None:
    require_permission(await verifier(local).verify(sign(local.key, claims(**overrides))))


async def test_scope_claim_is_space_separated(local: LocalIssuer) -> None:
    token = sign(local.key, claims(scp=f"User.Read {SCOPE}"))
    assert (await verifier(local).verify(token)).scopes == {"User.Read", SCOPE}


# --- the verified-token cache ----------------------------------------------------------------


async def test_cache_does_not_outlive_the_token(local: LocalIssuer) -> None:
    clock = Clock()
    v = verifier(local, leeway=0, clock=clock)
    token = local.mint(client_id="app", user_id="alice", ttl_seconds=30)
    first = await v.verify(token)
    assert await v.verify(token) is first  # served from the cache
    clock.now = first.expires_at + 1
    assert await rejected(v, token) == "token expired"
    assert token not in v._cache


async def test_cache_is_bounded(local: LocalIssuer) -> None:
    v = verifier(local, cache_size=3)
    tokens = [local.mint(client_id="app", user_id=f"u{i}") for i in range(5)]
    for t in tokens:
        await v.verify(t)
    assert len(v._cache) == 3 and tokens[-1] in v._cache and tokens[0] not in v._cache


async def test_rejected_tokens_are_not_cached(local: LocalIssuer) -> None:
    v = verifier(local)
    token = sign(local.key, claims(aud="nope"))
    for _ in range(2):
        await rejected(v, token)
    assert not v._cache


# --- external issuers: discovery and JWKS over real HTTP -------------------------------------


class IdP:
    """A tiny OIDC provider on 127.0.0.1: discovery + JWKS, request counts, failure modes."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.hits: dict[str, int] = {"discovery": 0, "jwks": 0}
        self.fail = False
        self.delay = 0.0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(idp.delay)
                body: dict[str, Any]
                if self.path == "/.well-known/openid-configuration":
                    idp.hits["discovery"] += 1
                    body = {"issuer": idp.issuer, "jwks_uri": f"{idp.url}/keys"}
                elif self.path == "/keys":
                    idp.hits["jwks"] += 1
                    body = {"keys": [k.as_dict(private=False) for k in idp.keys]}
                else:
                    self.send_error(404)
                    return
                if idp.fail:
                    self.send_error(503)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.issuer = f"{self.url}/tenant/v2.0"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def config(self, *, discovery: bool = True) -> IssuerConfig:
        if discovery:
            return IssuerConfig(
                self.issuer,
                "api://ext",
                discovery_url=f"{self.url}/.well-known/openid-configuration",
            )
        return IssuerConfig(self.issuer, "api://ext", jwks_url=f"{self.url}/keys")

    def token(self, key: Any, *, alg: str = "RS256", kid: str | None = "", **kw: Any) -> str:
        return sign(key, claims(iss=self.issuer, aud="api://ext", **kw), alg=alg, kid=kid)


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join()


@pytest.fixture
async def make_verifier() -> AsyncIterator[Callable[..., TokenVerifier]]:
    made: list[TokenVerifier] = []

    def make(*configs: IssuerConfig, **kw: Any) -> TokenVerifier:
        v = TokenVerifier(local=None, issuers=configs, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        await v.aclose()


async def test_discovery_then_jwks(idp: IdP, rsa_key: RSAKey, make_verifier: Any) -> None:
    idp.keys = [RSAKey.generate_key(2048, auto_kid=True), rsa_key]
    v = make_verifier(idp.config())
    p = await v.verify(idp.token(rsa_key))
    assert p.user_id == "user-1" and p.client_id == "client-1"
    await v.verify(idp.token(idp.keys[0], oid="bob"))
    assert idp.hits == {"discovery": 1, "jwks": 1}  # keys are cached


async def test_jwks_url_with_ec_keys(idp: IdP, make_verifier: Any) -> None:
    ec = ECKey.generate_key("P-256", auto_kid=True)
    idp.keys = [ec]
    v = make_verifier(idp.config(discovery=False))
    assert (await v.verify(idp.token(ec, alg="ES256"))).user_id == "user-1"
    assert idp.hits == {"discovery": 0, "jwks": 1}
    # A token claiming the external issuer but signed by the local key is rejected.
    local_key = RSAKey.generate_key(2048, auto_kid=True)
    assert "no key with kid" in await rejected(v, idp.token(local_key))


async def test_key_rotation_is_picked_up_without_hammering(idp: IdP, make_verifier: Any) -> None:
    old = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [old]
    clock = Clock()
    v = make_verifier(idp.config(), refetch_interval=30, clock=clock)
    await v.verify(idp.token(old))
    new = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [old, new]
    clock.now += 31
    assert (await v.verify(idp.token(new))).user_id == "user-1"  # new kid → refetched
    assert idp.hits["jwks"] == 2
    for kid in ("junk-1", "junk-2", "junk-3"):  # unknown kids within the interval: no fetch
        assert "no key with kid" in await rejected(v, idp.token(new, kid=kid))
    assert idp.hits["jwks"] == 2
    clock.now += 31
    assert "no key with kid 'junk-4'" in await rejected(v, idp.token(new, kid="junk-4"))
    assert idp.hits["jwks"] == 3


async def test_jwks_refreshed_after_ttl(idp: IdP, make_verifier: Any) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [key]
    clock = Clock()
    v = make_verifier(idp.config(), jwks_ttl=3600, clock=clock)
    await v.verify(idp.token(key))
    clock.now += 3601
    await v.verify(idp.token(key, oid="other", exp=int(clock.now) + 600))
    assert idp.hits["jwks"] == 2


async def test_concurrent_misses_share_one_fetch(idp: IdP, make_verifier: Any) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [key]
    idp.delay = 0.2
    v = make_verifier(idp.config(discovery=False))
    tokens = [idp.token(key, oid=f"user-{i}") for i in range(10)]
    results = await asyncio.gather(*(v.verify(t) for t in tokens))
    assert [p.user_id for p in results] == [f"user-{i}" for i in range(10)]
    assert idp.hits["jwks"] == 1


async def test_idp_unreachable_is_unauthenticated(
    make_verifier: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    v = make_verifier(IssuerConfig("https://down.example", "api://ext", jwks_url=f"{url}/keys"))
    key = RSAKey.generate_key(2048, auto_kid=True)
    token = sign(key, claims(iss="https://down.example", aud="api://ext"))
    with caplog.at_level(logging.WARNING, logger="herald.auth"):
        assert "unavailable" in await rejected(v, token)
    assert "cannot fetch signing keys of issuer https://down.example" in caplog.text


async def test_idp_errors_back_off_then_recover(idp: IdP, make_verifier: Any) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [key]
    idp.fail = True
    clock = Clock()
    v = make_verifier(idp.config(discovery=False), failure_backoff=5, clock=clock)
    for _ in range(3):
        assert "unavailable" in await rejected(v, idp.token(key))
    assert idp.hits["jwks"] == 1  # no fetch per request while it is down
    idp.fail = False
    clock.now += 6
    assert (await v.verify(idp.token(key))).user_id == "user-1"


async def test_stale_keys_are_kept_when_idp_fails(idp: IdP, make_verifier: Any) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [key]
    clock = Clock()
    v = make_verifier(idp.config(), jwks_ttl=60, clock=clock)
    await v.verify(idp.token(key))
    idp.fail = True
    clock.now += 120
    assert (await v.verify(idp.token(key, oid="again"))).user_id == "again"


async def test_bad_jwks_documents(idp: IdP, make_verifier: Any) -> None:
    idp.keys = []  # an empty set is unusable
    key = RSAKey.generate_key(2048, auto_kid=True)
    v = make_verifier(idp.config())
    assert "unavailable" in await rejected(v, idp.token(key))


def test_issuer_config_needs_a_key_source() -> None:
    with pytest.raises(ValueError, match="jwks_url or a discovery_url"):
        IssuerConfig("https://x", "aud")


# --- the token endpoint ----------------------------------------------------------------------


class FakeStore:
    """Only what the token endpoint uses: registered apps by client id."""

    def __init__(self, *apps: App) -> None:
        self.apps = {a.client_id: a for a in apps}

    async def get_app(self, client_id: str) -> App | None:
        return self.apps.get(client_id)


CLIENT_ID = new_client_id()
SECRET = new_client_secret()
SECRET_HASH = hash_secret(SECRET)


@pytest.fixture
async def endpoint(local: LocalIssuer) -> AsyncIterator[tuple[httpx.AsyncClient, TokenVerifier]]:
    app = Starlette(routes=token_api.routes())
    registered = App(
        client_id=CLIENT_ID,
        host_name="app.example.com",
        display_name="Example",
        secret_hash=SECRET_HASH,
        created_date_time=datetime.now(UTC),
    )
    v = TokenVerifier(local=local, issuers=())
    app.state.services = SimpleNamespace(
        directory=FakeStore(registered),
        issuer=local,
        verifier=v,
        settings=SimpleNamespace(token_ttl=600),
        token_limiter=Limiter(1000.0, 1000),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISS) as client:
        yield client, v


async def test_token_requests_are_rate_limited_per_address(endpoint: Any) -> None:
    client, _ = endpoint
    client._transport.app.state.services.token_limiter = Limiter(1.0, 2)
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "wrong"}
    codes = [(await client.post("/oauth2/v2.0/token", data=form)).status_code for _ in range(3)]
    assert codes == [401, 401, 429]
    limited = await client.post("/oauth2/v2.0/token", data=form)
    assert limited.json()["error"] == "slow_down" and int(limited.headers["retry-after"]) >= 1


async def test_client_credentials_form(endpoint: Any) -> None:
    client, v = endpoint
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": SECRET}
    r = await client.post("/oauth2/v2.0/token", data=form)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600
    p = await v.verify(body["access_token"])
    assert p.app_only and p.client_id == CLIENT_ID and p.roles == {SCOPE}
    require_permission(p)


@pytest.mark.parametrize("scope", [".default", f"{AUD}/.default", SCOPE, "https://x/.default"])
async def test_client_credentials_basic_and_scope(endpoint: Any, scope: str) -> None:
    client, v = endpoint
    r = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": scope},
        auth=(CLIENT_ID, SECRET),
    )
    assert r.status_code == 200, r.text
    assert (await v.verify(r.json()["access_token"])).client_id == CLIENT_ID


async def post(client: httpx.AsyncClient, form: dict[str, str], **kw: Any) -> httpx.Response:
    return await client.post("/oauth2/v2.0/token", data=form, **kw)


def good(**overrides: str) -> dict[str, str]:
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": SECRET}
    form.update(overrides)
    return {k: v for k, v in form.items() if v != "-"}


@pytest.mark.parametrize(
    ("form", "error"),
    [
        (good(client_secret="wrong"), "invalid_client"),
        (good(client_id=new_client_id()), "invalid_client"),
        (good(client_secret="-"), "invalid_client"),
    ],
)
async def test_bad_client_credentials(endpoint: Any, form: dict[str, str], error: str) -> None:
    client, _ = endpoint
    r = await post(client, form)
    assert r.status_code == 401
    assert r.json()["error"] == error and r.json()["error_description"]
    assert r.headers["www-authenticate"].startswith("Basic")
    assert r.headers["cache-control"] == "no-store"


async def test_wrong_basic_secret(endpoint: Any) -> None:
    client, _ = endpoint
    r = await post(client, {"grant_type": "client_credentials"}, auth=(CLIENT_ID, "nope"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("form", "error"),
    [
        (good(grant_type="password"), "unsupported_grant_type"),
        (good(grant_type="-"), "invalid_request"),
        (good(client_id="-"), "invalid_request"),
        (good(scope="User.Read"), "invalid_scope"),
    ],
)
async def test_bad_requests(endpoint: Any, form: dict[str, str], error: str) -> None:
    client, _ = endpoint
    r = await post(client, form)
    assert r.status_code == 400 and r.json()["error"] == error


async def test_two_auth_methods_rejected(endpoint: Any) -> None:
    client, _ = endpoint
    r = await post(client, good(), auth=(CLIENT_ID, SECRET))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


async def test_json_body_and_repeated_parameters_rejected(endpoint: Any) -> None:
    client, _ = endpoint
    r = await client.post("/oauth2/v2.0/token", json=good())
    assert r.status_code == 400 and "x-www-form-urlencoded" in r.json()["error_description"]
    body = "grant_type=client_credentials&client_id=a&client_id=b&client_secret=x"
    headers = {"content-type": "application/x-www-form-urlencoded"}
    r = await client.post("/oauth2/v2.0/token", content=body, headers=headers)
    assert r.status_code == 400 and "client_id" in r.json()["error_description"]


async def test_get_on_token_endpoint_not_allowed(endpoint: Any) -> None:
    client, _ = endpoint
    assert (await client.get("/oauth2/v2.0/token")).status_code == 405


async def test_secrets_never_logged(endpoint: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, _ = endpoint
    with caplog.at_level(logging.DEBUG):
        await post(client, good())
        await post(client, good(client_secret=SECRET + "x"))
        await post(client, {"grant_type": "client_credentials"}, auth=(CLIENT_ID, SECRET))
        await post(client, good(client_id=new_client_id()))
    assert "issued an app-only token" in caplog.text
    assert "client authentication failed" in caplog.text
    assert SECRET not in caplog.text and SECRET_HASH not in caplog.text


async def test_discovery_and_keys_make_herald_an_issuer(endpoint: Any, local: LocalIssuer) -> None:
    client, _ = endpoint
    doc = (await client.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == ISS and doc["token_endpoint"] == f"{ISS}/oauth2/v2.0/token"
    assert doc["jwks_uri"] == f"{ISS}/discovery/v2.0/keys"
    assert "client_credentials" in doc["grant_types_supported"]
    assert (await client.get("/discovery/v2.0/keys")).json() == local.jwks()
    # Another Herald trusting this one through discovery.
    other = TokenVerifier(
        local=None,
        issuers=[IssuerConfig(ISS, AUD, discovery_url=f"{ISS}/.well-known/openid-configuration")],
        http=client,
    )
    p = await other.verify(local.mint(client_id="app", user_id="alice"))
    assert p.user_id == "alice"


def test_key_file_mode_survives_umask(tmp_path: pathlib.Path) -> None:
    old = os.umask(0)
    try:
        LocalIssuer.load_or_create(tmp_path, ISS, AUD)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / issuer_module.KEY_FILE).stat().st_mode) == 0o600


def test_corrupt_key_file_is_an_error_not_a_new_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / issuer_module.KEY_FILE
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(RuntimeError, match="cannot read the issuer signing key"):
        LocalIssuer.load_or_create(tmp_path, ISS, AUD)
    assert path.read_text() == "{not json"


async def test_discovery_with_a_urn_issuer_points_at_this_server(rsa_key: RSAKey) -> None:
    urn = LocalIssuer(rsa_key, issuer_url="urn:herald:local", audience=AUD)
    app = Starlette(routes=token_api.routes())
    app.state.services = SimpleNamespace(issuer=urn)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://h:8080") as client:
        doc = (await client.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == "urn:herald:local"
    assert doc["token_endpoint"] == "http://h:8080/oauth2/v2.0/token"
    assert doc["jwks_uri"] == "http://h:8080/discovery/v2.0/keys"


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "ES384"])
async def test_other_asymmetric_algorithms(idp: IdP, make_verifier: Any, alg: str) -> None:
    key: Any = (
        ECKey.generate_key("P-384", auto_kid=True)
        if alg == "ES384"
        else RSAKey.generate_key(2048, auto_kid=True)
    )
    idp.keys = [key]
    v = make_verifier(idp.config(discovery=False))
    assert (await v.verify(idp.token(key, alg=alg))).user_id == "user-1"


async def test_encryption_keys_in_jwks_are_ignored(idp: IdP, make_verifier: Any) -> None:
    enc = RSAKey.generate_key(2048, parameters={"use": "enc"}, auto_kid=True)
    sig = RSAKey.generate_key(2048, auto_kid=True)
    idp.keys = [enc, sig]
    v = make_verifier(idp.config(discovery=False))
    assert (await v.verify(idp.token(sig))).user_id == "user-1"
    same_material = RSAKey.import_key({**enc.as_dict(private=True), "use": "sig"})
    assert "no key with kid" in await rejected(v, idp.token(same_material, kid=enc.kid))
