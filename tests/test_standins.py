"""The push-service stand-ins (tests/standins) accept what the real services accept, built by
independent clients (pywebpush, py_vapid, joserfc, google-auth, httpx over HTTP/2), and refuse,
with the real service's status and reason, every kind of request the real service refuses."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import google.auth.transport.requests
import httpx
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.oauth2 import service_account
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from py_vapid import Vapid02
from pywebpush import WebPusher, webpush  # type: ignore[import-untyped]

from tests.standins import (
    ApnsStandIn,
    FcmStandIn,
    StandIn,
    TlsFiles,
    WebPushStandIn,
    WnsStandIn,
    make_tls,
    spawn,
)
from tests.standins.jws import b64url_encode, p256_point

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
MESSAGE = {"type": "alert", "position": 12, "id": "n1", "title": "Your order shipped"}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="module")
def client(tls: TlsFiles) -> Iterator[httpx.Client]:
    """An HTTP/2 client (ALPN h2) that trusts only the stand-in CA."""
    with httpx.Client(http2=True, verify=tls.client_context(), trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def client11(tls: TlsFiles) -> Iterator[httpx.Client]:
    with httpx.Client(verify=tls.client_context(), trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def session(tls: TlsFiles) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.verify = str(tls.ca_file)
        s.trust_env = False  # else REQUESTS_CA_BUNDLE overrides verify
        yield s


def _running(standin: StandIn) -> Iterator[StandIn]:
    with standin:
        yield standin


@pytest.fixture(scope="module")
def webpush_service(tls: TlsFiles) -> Iterator[StandIn]:
    yield from _running(WebPushStandIn(tls))


@pytest.fixture(scope="module")
def apns_service(tls: TlsFiles) -> Iterator[StandIn]:
    yield from _running(ApnsStandIn(tls))


@pytest.fixture(scope="module")
def fcm_service(tls: TlsFiles) -> Iterator[StandIn]:
    yield from _running(FcmStandIn(tls))


@pytest.fixture(scope="module")
def wns_service(tls: TlsFiles) -> Iterator[StandIn]:
    yield from _running(WnsStandIn(tls))


@pytest.fixture
def wp(webpush_service: WebPushStandIn) -> Iterator[WebPushStandIn]:
    yield webpush_service
    webpush_service.reset()


@pytest.fixture
def apns(apns_service: ApnsStandIn) -> Iterator[ApnsStandIn]:
    yield apns_service
    apns_service.reset()


@pytest.fixture
def fcm(fcm_service: FcmStandIn) -> Iterator[FcmStandIn]:
    yield fcm_service
    fcm_service.reset()


@pytest.fixture
def wns(wns_service: WnsStandIn) -> Iterator[WnsStandIn]:
    yield wns_service
    wns_service.reset()


# -- Web Push -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vapid() -> Vapid02:
    v = Vapid02()
    v.generate_keys()
    return v


def vapid_auth(
    key: ec.EllipticCurvePrivateKey, claims: dict[str, Any], k: ec.EllipticCurvePublicKey | None
) -> str:
    """An RFC 8292 Authorization header signed with `key` (k: the key it names)."""
    token = jwt.encode({"alg": "ES256", "typ": "JWT"}, claims, ECKey.import_key(key))
    point = p256_point(k or key.public_key())
    return f"vapid t={token}, k={b64url_encode(point)}"


def push_request(
    wp: WebPushStandIn,
    sub: dict[str, Any],
    vapid: Vapid02,
    *,
    data: bytes = json.dumps(MESSAGE).encode(),
    claims: dict[str, Any] | None = None,
    encrypt_for: dict[str, Any] | None = None,
    **headers: str,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a correct push (encrypted with pywebpush, signed with joserfc);
    `claims` override JWT claims, `headers` override headers (a value of "" drops it)."""
    body = WebPusher(encrypt_for or sub).encode(data)["body"]
    full = {
        "aud": wp.url,
        "exp": int(time.time()) + 3600,
        "sub": "mailto:ops@example.com",
        **(claims or {}),
    }
    full = {k: v for k, v in full.items() if v is not None}
    out = {
        "Authorization": vapid_auth(vapid.private_key, full, None),
        "TTL": "60",
        "Content-Encoding": "aes128gcm",
        **headers,
    }
    return {k: v for k, v in out.items() if v != ""}, body


def test_webpush_accepts_what_pywebpush_sends(
    wp: WebPushStandIn, vapid: Vapid02, session: requests.Session
) -> None:
    sub = wp.subscribe()
    assert sub["endpoint"].startswith(f"{wp.url}/push/")
    response = webpush(
        sub,
        json.dumps(MESSAGE),
        vapid_private_key=vapid,
        vapid_claims={"sub": "mailto:ops@example.com"},
        ttl=600,
        headers={"Urgency": "high", "Topic": "order-17"},
        requests_session=session,
    )
    assert isinstance(response, requests.Response)
    assert response.status_code == 201
    assert response.headers["Location"].startswith(f"{wp.url}/m/")
    assert response.headers["TTL"] == "600"
    (delivery,) = wp.wait_accepted(1, target=sub["endpoint"])
    assert delivery.message == MESSAGE
    assert delivery.details["ttl"] == 600
    assert delivery.details["urgency"] == "high"
    assert delivery.details["topic"] == "order-17"
    assert delivery.details["vapid_sub"] == "mailto:ops@example.com"
    assert wp.stats()["vapid_tokens"] == 1


def test_webpush_over_http2_with_http_ece_and_py_vapid(
    wp: WebPushStandIn, vapid: Vapid02, client: httpx.Client
) -> None:
    sub = wp.subscribe(b64url_encode(p256_point(vapid.public_key)))  # a restricted subscription
    body = WebPusher(sub).encode(json.dumps(MESSAGE).encode())["body"]
    headers = vapid.sign({"aud": wp.url, "sub": "https://example.com"})
    headers |= {"TTL": "0", "Content-Encoding": "aes128gcm", "Urgency": "very-low"}
    response = client.post(sub["endpoint"], content=body, headers=headers)
    assert (response.status_code, response.http_version) == (201, "HTTP/2")
    assert wp.messages() == [MESSAGE]


def _other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("no authorization", 401, "MissingAuthorization"),
        ("WebPush scheme", 401, "NotVapid"),
        ("signed by another key", 403, "BadVapidToken"),
        ("aud of another origin", 403, "BadAudience"),
        ("aud with a path", 403, "BadAudience"),
        ("expired", 403, "ExpiredVapidToken"),
        ("exp over 24 h", 403, "VapidExpTooFar"),
        ("no sub", 403, "BadSubject"),
        ("sub not a URL", 403, "BadSubject"),
        ("not the subscription's key", 403, "VapidKeyMismatch"),
        ("no TTL", 400, "MissingTTL"),
        ("negative TTL", 400, "BadTTL"),
        ("TTL not a number", 400, "BadTTL"),
        ("bad Urgency", 400, "BadUrgency"),
        ("Topic too long", 400, "BadTopic"),
        ("Topic outside base64url", 400, "BadTopic"),
        ("aesgcm", 415, "UnsupportedEncoding"),
        ("no Content-Encoding", 400, "MissingContentEncoding"),
        ("encrypted for other keys", 400, "DecryptionFailed"),
        ("corrupted", 400, "DecryptionFailed"),
        ("too large", 413, "PayloadTooLarge"),
        ("not JSON", 400, "NotJson"),
        ("unknown endpoint", 404, "NotFound"),
        ("gone", 410, "Gone"),
    ],
)
def test_webpush_refuses(
    wp: WebPushStandIn,
    vapid: Vapid02,
    client: httpx.Client,
    case: str,
    status: int,
    reason: str,
) -> None:
    sub = wp.subscribe()
    endpoint = sub["endpoint"]
    kw: dict[str, Any] = {}
    if case == "no authorization":
        kw["Authorization"] = ""
    elif case == "WebPush scheme":
        kw["Authorization"] = (
            "WebPush "
            + vapid.sign({"aud": wp.url, "sub": "mailto:a@b.c"})["Authorization"]
            .split("t=")[1]
            .split(",")[0]
        )
    elif case == "signed by another key":
        claims = {"aud": wp.url, "exp": int(time.time()) + 60, "sub": "mailto:a@b.c"}
        kw["Authorization"] = vapid_auth(_other_key(), claims, vapid.public_key)
    elif case == "aud of another origin":
        kw["claims"] = {"aud": "https://push.example.net"}
    elif case == "aud with a path":
        kw["claims"] = {"aud": wp.url + "/"}
    elif case == "expired":
        kw["claims"] = {"exp": int(time.time()) - 10}
    elif case == "exp over 24 h":
        kw["claims"] = {"exp": int(time.time()) + 24 * 3600 + 120}
    elif case == "no sub":
        kw["claims"] = {"sub": None}
    elif case == "sub not a URL":
        kw["claims"] = {"sub": "ops@example.com"}
    elif case == "not the subscription's key":
        endpoint = (sub := wp.subscribe(b64url_encode(p256_point(_other_key().public_key()))))[
            "endpoint"
        ]
    elif case == "no TTL":
        kw["TTL"] = ""
    elif case == "negative TTL":
        kw["TTL"] = "-1"
    elif case == "TTL not a number":
        kw["TTL"] = "1h"
    elif case == "bad Urgency":
        kw["Urgency"] = "urgent"
    elif case == "Topic too long":
        kw["Topic"] = "a" * 33
    elif case == "Topic outside base64url":
        kw["Topic"] = "order+17"
    elif case == "aesgcm":
        kw["Content-Encoding"] = "aesgcm"
    elif case == "no Content-Encoding":
        kw["Content-Encoding"] = ""
    elif case == "encrypted for other keys":
        kw["encrypt_for"] = wp.subscribe()
    elif case == "too large":
        kw["data"] = json.dumps({"body": "x" * 4100}).encode()
    elif case == "not JSON":
        kw["data"] = b"hello"
    elif case == "unknown endpoint":
        endpoint = f"{wp.url}/push/nope"
    elif case == "gone":
        wp.gone(endpoint)
    headers, body = push_request(wp, sub, vapid, **kw)
    if case == "corrupted":
        body = body[:-1] + bytes([body[-1] ^ 1])
    response = client.post(endpoint, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert wp.accepted() == []
    (refusal,) = wp.refused()
    assert (refusal.status, refusal.reason) == (status, reason)
    assert response.json()["code"] == status
    if status == 401:
        assert response.headers["www-authenticate"] == "vapid"


def test_webpush_a_push_without_payload_needs_no_encryption(
    wp: WebPushStandIn, vapid: Vapid02, client: httpx.Client
) -> None:
    sub = wp.subscribe()
    no_encoding: dict[str, Any] = {"Content-Encoding": ""}
    headers, _ = push_request(wp, sub, vapid, **no_encoding)
    assert client.post(sub["endpoint"], headers=headers).status_code == 201
    assert wp.accepted()[0].payload is None


# -- APNs ---------------------------------------------------------------------------------------


def provider_token(
    apns: ApnsStandIn,
    *,
    key: str | None = None,
    kid: str | None = None,
    iss: str | None = None,
    iat: float | None = None,
) -> str:
    return jwt.encode(
        {"alg": "ES256", "kid": kid or apns.key_id},
        {"iss": iss or apns.team_id, "iat": int(time.time() if iat is None else iat)},
        ECKey.import_key(key or apns.key_pem),
    )


def apns_post(
    client: httpx.Client,
    apns: ApnsStandIn,
    token: str,
    payload: Any = None,
    *,
    auth: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> httpx.Response:
    base = {
        "authorization": f"bearer {auth or provider_token(apns)}",
        "apns-topic": apns.topic,
        "apns-push-type": "alert",
        "apns-priority": "10",
    }
    if isinstance(headers, list):
        merged: Any = [*base.items(), *headers]
    else:
        merged = {k: v for k, v in {**base, **(headers or {})}.items() if v != ""}
    if body is None:
        alert = {"aps": {"alert": {"title": "t", "body": "b"}}, "herald": MESSAGE}
        body = json.dumps(alert if payload is None else payload).encode()
    return client.post(f"{apns.url}/3/device/{token}", content=body, headers=merged)


def test_apns_accepts_an_alert_and_a_background_push(
    apns: ApnsStandIn, client: httpx.Client, tmp_path: Path
) -> None:
    key_file = apns.write_key(tmp_path)
    assert key_file.name == f"AuthKey_{apns.key_id}.p8"
    assert "BEGIN PRIVATE KEY" in key_file.read_text()  # PKCS#8, as Apple hands it out
    token = apns.new_token()
    apns_id = str(uuid.uuid4())
    payload = {
        "aps": {"alert": {"title": "t", "body": "b"}, "thread-id": "orders"},
        "herald": MESSAGE,
    }
    headers = {
        "apns-id": apns_id,
        "apns-expiration": str(int(time.time()) + 3600),
        "apns-collapse-id": "order-17",
    }
    response = apns_post(client, apns, token, payload, headers=headers)
    assert (response.status_code, response.http_version) == (200, "HTTP/2")
    assert response.headers["apns-id"] == apns_id
    background = {"aps": {"content-available": 1}, "herald": {**MESSAGE, "type": "sync"}}
    headers = {"apns-push-type": "background", "apns-priority": "5"}
    response = apns_post(client, apns, token, background, headers=headers)
    assert response.status_code == 200, response.text
    uuid.UUID(response.headers["apns-id"])
    alert, sync = apns.wait_accepted(2, target=token)
    assert (alert.kind, alert.message, alert.details["thread_id"]) == ("alert", MESSAGE, "orders")
    assert alert.details["collapse_id"] == "order-17"
    assert (sync.kind, sync.details["priority"], sync.message["type"]) == ("background", 5, "sync")
    assert apns.stats()["provider_tokens"] <= 2


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("HTTP/1.1", 505, "HTTP/1.1"),
        ("GET", 405, "MethodNotAllowed"),
        ("bad path", 404, "BadPath"),
        ("no authorization", 403, "MissingProviderToken"),
        ("signed by another key", 403, "InvalidProviderToken"),
        ("unknown key id", 403, "InvalidProviderToken"),
        ("another team", 403, "InvalidProviderToken"),
        ("iat over an hour ago", 403, "ExpiredProviderToken"),
        ("iat in the future", 403, "InvalidProviderToken"),
        ("HS256", 403, "InvalidProviderToken"),
        ("declared expired", 403, "ExpiredProviderToken"),
        ("no topic", 400, "MissingTopic"),
        ("another app's topic", 400, "TopicDisallowed"),
        ("token of another topic", 400, "DeviceTokenNotForTopic"),
        ("token not hex", 400, "BadDeviceToken"),
        ("unknown token", 400, "BadDeviceToken"),
        ("duplicate headers", 400, "DuplicateHeaders"),
        ("no push type", 400, "InvalidPushType"),
        ("voip push type", 400, "InvalidPushType"),
        ("priority 7", 400, "BadPriority"),
        ("background at priority 10", 400, "BadPriority"),
        ("background with an alert", 400, "InvalidPushType"),
        ("background without content-available", 400, "InvalidPushType"),
        ("alert without aps.alert", 400, "InvalidPushType"),
        ("expiration not a number", 400, "BadExpirationDate"),
        ("collapse id over 64 bytes", 400, "BadCollapseId"),
        ("apns-id not a UUID", 400, "BadMessageId"),
        ("empty payload", 400, "PayloadEmpty"),
        ("payload not JSON", 400, "BadPayload"),
        ("payload too large", 413, "PayloadTooLarge"),
        ("unregistered", 410, "Unregistered"),
    ],
)
def test_apns_refuses(
    apns: ApnsStandIn,
    client: httpx.Client,
    client11: httpx.Client,
    case: str,
    status: int,
    reason: str,
) -> None:
    token = apns.new_token()
    use = client
    kw: dict[str, Any] = {}
    other = ec.generate_private_key(ec.SECP256R1())
    other_pem = ECKey.import_key(other).as_pem(private=True).decode()
    background = {"apns-push-type": "background", "apns-priority": "5"}
    if case == "HTTP/1.1":
        use = client11
    elif case == "GET":
        response = client.get(f"{apns.url}/3/device/{token}")
    elif case == "bad path":
        response = client.post(f"{apns.url}/2/device/{token}", content=b"{}")
    elif case == "no authorization":
        response = client.post(f"{apns.url}/3/device/{token}", content=b"{}")
    elif case == "signed by another key":
        kw["auth"] = provider_token(apns, key=other_pem)
    elif case == "unknown key id":
        kw["auth"] = provider_token(apns, kid="ABCDE12345")
    elif case == "another team":
        kw["auth"] = provider_token(apns, iss="OTHERTEAM1")
    elif case == "iat over an hour ago":
        kw["auth"] = provider_token(apns, iat=time.time() - 3700)
    elif case == "iat in the future":
        kw["auth"] = provider_token(apns, iat=time.time() + 600)
    elif case == "HS256":
        from joserfc.jwk import OctKey

        kw["auth"] = jwt.encode(
            {"alg": "HS256", "kid": apns.key_id},
            {"iss": apns.team_id, "iat": int(time.time())},
            OctKey.import_key(b"k" * 32),
        )
    elif case == "declared expired":
        kw["auth"] = provider_token(apns)
        assert apns_post(client, apns, token, auth=kw["auth"]).status_code == 200
        apns.expire_provider_tokens()
    elif case == "no topic":
        kw["headers"] = {"apns-topic": ""}
    elif case == "another app's topic":
        kw["headers"] = {"apns-topic": "com.example.other"}
    elif case == "token of another topic":
        apns.add_topic("com.example.other")
        token = apns.new_token("com.example.other")
    elif case == "token not hex":
        token = "z" * 64
    elif case == "unknown token":
        token = "ab" * 32
    elif case == "duplicate headers":
        kw["headers"] = [("apns-collapse-id", "a"), ("apns-collapse-id", "b")]
    elif case == "no push type":
        kw["headers"] = {"apns-push-type": ""}
    elif case == "voip push type":
        kw["headers"] = {"apns-push-type": "voip"}
    elif case == "priority 7":
        kw["headers"] = {"apns-priority": "7"}
    elif case == "background at priority 10":
        kw["headers"] = {**background, "apns-priority": "10"}
        kw["payload"] = {"aps": {"content-available": 1}}
    elif case == "background with an alert":
        kw["headers"] = background
        kw["payload"] = {"aps": {"content-available": 1, "alert": "hi"}}
    elif case == "background without content-available":
        kw["headers"] = background
        kw["payload"] = {"aps": {}}
    elif case == "alert without aps.alert":
        kw["payload"] = {"aps": {"sound": "default"}}
    elif case == "expiration not a number":
        kw["headers"] = {"apns-expiration": "tomorrow"}
    elif case == "collapse id over 64 bytes":
        kw["headers"] = {"apns-collapse-id": "c" * 65}
    elif case == "apns-id not a UUID":
        kw["headers"] = {"apns-id": "17"}
    elif case == "empty payload":
        kw["body"] = b""
    elif case == "payload not JSON":
        kw["body"] = b"{aps:"
    elif case == "payload too large":
        kw["payload"] = {"aps": {"alert": "x" * 4100}}
    elif case == "unregistered":
        apns.gone(token)
    if case not in ("GET", "bad path", "no authorization"):
        response = apns_post(use, apns, token, **kw)
    assert response.status_code == status, response.text
    refusals = apns.refused()
    assert (refusals[-1].status, refusals[-1].reason) == (status, reason)
    if case != "HTTP/1.1":
        assert response.json()["reason"] == reason
        uuid.UUID(response.headers["apns-id"])  # on errors too
    if status == 410:
        assert abs(response.json()["timestamp"] / 1000 - time.time()) < 60
    assert apns.accepted(kind="alert") == ([] if case != "declared expired" else apns.accepted())


def test_apns_revoked_key_and_new_token_after_expiry(
    apns: ApnsStandIn, client: httpx.Client
) -> None:
    token = apns.new_token()
    kid, pem = apns.add_key()
    assert (
        apns_post(client, apns, token, auth=provider_token(apns, key=pem, kid=kid)).status_code
        == 200
    )
    apns.revoke_key(kid)
    response = apns_post(client, apns, token, auth=provider_token(apns, key=pem, kid=kid))
    assert (response.status_code, response.json()["reason"]) == (403, "InvalidProviderToken")
    apns.expire_provider_tokens()
    assert apns_post(client, apns, token).status_code == 200  # a freshly signed token


# -- FCM ----------------------------------------------------------------------------------------


def fcm_credentials(
    fcm: FcmStandIn, session: requests.Session, scopes: tuple[str, ...] = (FCM_SCOPE,)
) -> service_account.Credentials:
    info = fcm.service_account()
    creds: service_account.Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=list(scopes)
    )
    creds.refresh(google.auth.transport.requests.Request(session))  # type: ignore[no-untyped-call]
    return creds


def fcm_send(
    client: httpx.Client,
    fcm: FcmStandIn,
    access_token: str | None,
    message: dict[str, Any],
    *,
    project: str | None = None,
    body: dict[str, Any] | None = None,
) -> httpx.Response:
    url = f"{fcm.url}/v1/projects/{project or fcm.project_id}/messages:send"
    headers = {"authorization": f"Bearer {access_token}"} if access_token else {}
    return client.post(url, json={"message": message} if body is None else body, headers=headers)


@pytest.fixture
def fcm_token(fcm: FcmStandIn, session: requests.Session) -> str:
    return str(fcm_credentials(fcm, session).token)


def test_fcm_accepts_google_auth_and_a_v1_message(
    fcm: FcmStandIn, session: requests.Session, client: httpx.Client
) -> None:
    creds = fcm_credentials(fcm, session)
    assert str(creds.token).startswith("ya29.") and creds.expiry is not None
    assert fcm.stats()["token_requests"] == 1
    token = fcm.new_token()
    data = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in MESSAGE.items()}
    message = {
        "token": token,
        "notification": {"title": "Your order shipped", "body": "…"},
        "data": data,
        "android": {
            "priority": "HIGH",
            "ttl": "86400s",
            "collapse_key": "order-17",
            "notification": {"tag": "order-17"},
        },
    }
    response = fcm_send(client, fcm, creds.token, message)
    assert response.status_code == 200, response.text
    assert response.json()["name"].startswith(f"projects/{fcm.project_id}/messages/")
    (delivery,) = fcm.wait_accepted(1, target=token)
    assert (delivery.kind, delivery.message) == ("notification", data)
    assert delivery.details["ttl"] == "86400s" and delivery.details["tag"] == "order-17"
    camel = {"token": token, "data": {"a": "1"}, "android": {"collapseKey": "k", "ttl": "1.5s"}}
    assert fcm_send(client, fcm, creds.token, camel).status_code == 200  # proto JSON names
    validate = {"validate_only": True, "message": {"token": token, "data": {"a": "1"}}}
    assert fcm_send(client, fcm, creds.token, {}, body=validate).status_code == 200
    assert [d.kind for d in fcm.accepted()] == ["notification", "data"]  # not validate_only


def _assertion(fcm: FcmStandIn, **override: Any) -> str:
    info = fcm.service_account()
    now = int(time.time())
    claims = {
        "iss": info["client_email"],
        "aud": info["token_uri"],
        "scope": FCM_SCOPE,
        "iat": now,
        "exp": now + 3600,
    }
    key_pem = override.pop("key", info["private_key"])
    header = {"alg": "RS256", "typ": "JWT", "kid": override.pop("kid", info["private_key_id"])}
    claims |= override
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(header, claims, RSAKey.import_key(key_pem))


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("signed by another key", "invalid_grant"),
        ("another key id", "invalid_grant"),
        ("unknown account", "invalid_grant"),
        ("aud of another token endpoint", "invalid_grant"),
        ("lives over an hour", "invalid_grant"),
        ("expired", "invalid_grant"),
        ("no scope", "invalid_scope"),
        ("client credentials grant", "unsupported_grant_type"),
        ("JSON body", "invalid_request"),
    ],
)
def test_fcm_token_endpoint_refuses(
    fcm: FcmStandIn, client: httpx.Client, case: str, error: str
) -> None:
    now = int(time.time())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assertion = {
        "signed by another key": lambda: _assertion(fcm, key=other),
        "another key id": lambda: _assertion(fcm, kid="0" * 40),
        "unknown account": lambda: _assertion(fcm, iss="someone@elsewhere.iam.gserviceaccount.com"),
        "aud of another token endpoint": lambda: _assertion(
            fcm, aud="https://auth.example.com/token"
        ),
        "lives over an hour": lambda: _assertion(fcm, exp=now + 7200),
        "expired": lambda: _assertion(fcm, iat=now - 7200, exp=now - 3600),
        "no scope": lambda: _assertion(fcm, scope=None),
    }.get(case, lambda: _assertion(fcm))()
    grant = "client_credentials" if case == "client credentials grant" else None
    form = {"grant_type": grant or "urn:ietf:params:oauth:grant-type:jwt-bearer"}
    form["assertion"] = assertion
    if case == "JSON body":
        response = client.post(fcm.token_uri, json=form)
    else:
        response = client.post(
            fcm.token_uri,
            content=urlencode(form),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 400
    assert response.json()["error"] == error
    assert fcm.stats().get("tokens_issued", 0) == 0


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no token", 401, "UNAUTHENTICATED"),
        ("expired token", 401, "UNAUTHENTICATED"),
        ("insufficient scope", 403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT"),
        ("another project", 403, "PERMISSION_DENIED"),
        ("non-string data", 400, "INVALID_ARGUMENT"),
        ("reserved data key", 400, "INVALID_ARGUMENT"),
        ("unknown message field", 400, "INVALID_ARGUMENT"),
        ("unknown top-level field", 400, "INVALID_ARGUMENT"),
        ("no target", 400, "INVALID_ARGUMENT"),
        ("two targets", 400, "INVALID_ARGUMENT"),
        ("unknown notification field", 400, "INVALID_ARGUMENT"),
        ("bad android priority", 400, "INVALID_ARGUMENT"),
        ("ttl without s", 400, "INVALID_ARGUMENT"),
        ("ttl over 28 days", 400, "INVALID_ARGUMENT"),
        ("too big", 400, "INVALID_ARGUMENT"),
        ("invalid registration token", 400, "INVALID_ARGUMENT"),
        ("token of another sender", 403, "SENDER_ID_MISMATCH"),
        ("unregistered", 404, "UNREGISTERED"),
    ],
)
def test_fcm_refuses(
    fcm: FcmStandIn,
    session: requests.Session,
    client: httpx.Client,
    fcm_token: str,
    case: str,
    status: int,
    code: str,
) -> None:
    token = fcm.new_token()
    access: str | None = fcm_token
    message: dict[str, Any] = {"token": token, "data": {"type": "alert"}}
    kw: dict[str, Any] = {}
    if case == "no token":
        access = None
    elif case == "expired token":
        access = str(fcm_credentials(fcm, session).token)
        fcm.expire_tokens()
    elif case == "insufficient scope":
        scope = "https://www.googleapis.com/auth/userinfo.email"
        access = str(fcm_credentials(fcm, session, (scope,)).token)
    elif case == "another project":
        kw["project"] = "someone-else"
    elif case == "non-string data":
        message["data"] = {"type": "alert", "position": 12}
    elif case == "reserved data key":
        message["data"] = {"from": "me"}
    elif case == "unknown message field":
        message["priority"] = "high"
    elif case == "unknown top-level field":
        kw["body"] = {"message": message, "dry_run": True}
    elif case == "no target":
        del message["token"]
    elif case == "two targets":
        message["topic"] = "news"
    elif case == "unknown notification field":
        message["notification"] = {"title": "t", "subtitle": "s"}
    elif case == "bad android priority":
        message["android"] = {"priority": "URGENT"}
    elif case == "ttl without s":
        message["android"] = {"ttl": "86400"}
    elif case == "ttl over 28 days":
        message["android"] = {"ttl": f"{29 * 86400}s"}
    elif case == "too big":
        message["data"] = {"body": "x" * 3000}
        message["notification"] = {"body": "x" * 1200}
    elif case == "invalid registration token":
        message["token"] = "not-a-token"
    elif case == "token of another sender":
        message["token"] = fcm.new_token("another-project")
    elif case == "unregistered":
        fcm.gone(token)
    response = fcm_send(client, fcm, access, message, **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    if case not in ("no token", "expired token", "insufficient scope", "another project"):
        assert error["status"] in ("INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND")
        assert {d["@type"].rsplit(".", 1)[-1] for d in error["details"]} & {
            "FcmError",
            "BadRequest",
        }
    if code in ("UNREGISTERED", "SENDER_ID_MISMATCH"):
        assert error["details"] == [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]
    if status == 401:
        assert error["status"] == "UNAUTHENTICATED"
    assert fcm.refused()[-1].reason == code
    assert fcm.accepted() == []


# -- WNS ----------------------------------------------------------------------------------------

TOAST = (
    '<toast launch="{launch}"><visual><binding template="ToastGeneric">'
    "<text>Your order shipped</text><text>It is on its way</text>"
    "</binding></visual></toast>"
)


def wns_token(client: httpx.Client, wns: WnsStandIn, **override: str) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "client_id": wns.client_id,
        "client_secret": wns.client_secret,
        "scope": "notify.windows.com",
        **override,
    }
    return client.post(
        wns.token_url,
        content=urlencode(form),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )


@pytest.fixture
def wns_access(wns: WnsStandIn, client: httpx.Client) -> str:
    return str(wns_token(client, wns).json()["access_token"])


def toast_xml(message: dict[str, Any] = MESSAGE) -> bytes:
    launch = json.dumps(message).replace("&", "&amp;").replace('"', "&quot;")
    return TOAST.format(launch=launch).encode()


def wns_post(
    client: httpx.Client,
    channel: str,
    access: str | None,
    body: bytes | None = None,
    **headers: str,
) -> httpx.Response:
    base = {
        "authorization": f"Bearer {access}" if access else "",
        "x-wns-type": "wns/toast",
        "content-type": "text/xml",
    }
    merged = {k: v for k, v in {**base, **headers}.items() if v != ""}
    return client.post(channel, content=toast_xml() if body is None else body, headers=merged)


def test_wns_token_toast_raw_and_removals(
    wns: WnsStandIn, client11: httpx.Client, wns_access: str
) -> None:
    token = wns_token(client11, wns)
    assert token.status_code == 200
    assert token.json()["token_type"] == "bearer" and token.json()["expires_in"] == 86400
    channel = wns.new_channel()
    assert "?token=" in channel and "%3d" in channel  # percent-encoded as the real ones
    headers: dict[str, Any] = {
        "x-wns-tag": "order-17",
        "x-wns-group": "orders",
        "x-wns-ttl": "3600",
        "x-wns-priority": "1",
        "x-wns-requestforstatus": "true",
    }
    response = wns_post(client11, channel, wns_access, **headers)
    assert response.status_code == 200, response.headers
    assert response.headers["x-wns-status"] == "received"
    assert response.headers["x-wns-deviceconnectionstatus"] == "connected"
    assert len(response.headers["x-wns-msg-id"]) <= 16
    raw = json.dumps({**MESSAGE, "type": "sync"}).encode()
    response = wns_post(
        client11,
        channel,
        wns_access,
        raw,
        **{"x-wns-type": "wns/raw", "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    matches = [
        "type:wns/toast;group=orders;tag=order-17",
        "type:wns/toast;group=orders",
        "type:wns/toast;tag=order-17",
        "type:wns/toast;all",
    ]
    for match in matches:
        response = client11.delete(
            channel, headers={"authorization": f"Bearer {wns_access}", "x-wns-match": match}
        )
        assert response.status_code == 200, response.headers
    toast, raw_delivery, *removals = wns.wait_accepted(6, target=channel)
    assert (toast.kind, toast.message) == ("wns/toast", MESSAGE)
    assert (toast.details["title"], toast.details["body"]) == (
        "Your order shipped",
        "It is on its way",
    )
    assert (toast.details["tag"], toast.details["group"], toast.details["ttl"]) == (
        "order-17",
        "orders",
        3600,
    )
    assert raw_delivery.message["type"] == "sync"
    assert [r.details["match"] for r in removals] == [
        {"all": False, "group": "orders", "tag": "order-17"},
        {"all": False, "group": "orders", "tag": None},
        {"all": False, "group": None, "tag": "order-17"},
        {"all": True, "group": None, "tag": None},
    ]
    assert wns.removals(channel) == removals


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("bad secret", "invalid_client"),
        ("unknown client", "invalid_client"),
        ("wrong scope", "invalid_scope"),
        ("wrong grant", "unsupported_grant_type"),
    ],
)
def test_wns_token_endpoint_refuses(
    wns: WnsStandIn, client: httpx.Client, case: str, error: str
) -> None:
    override = {
        "bad secret": {"client_secret": "nope"},
        "unknown client": {"client_id": "ms-app://s-1-15-2-1"},
        "wrong scope": {"scope": "s.notify.live.net"},
        "wrong grant": {"grant_type": "password"},
    }[case]
    response = wns_token(client, wns, **override)
    assert (response.status_code, response.json()["error"]) == (400, error)


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no token", 401),
        ("expired token", 401),
        ("another app's token", 403),
        ("unknown channel", 404),
        ("gone", 410),
        ("GET", 405),
        ("bad type", 400),
        ("toast as octet-stream", 400),
        ("raw as text/xml", 400),
        ("malformed XML", 400),
        ("not a toast", 400),
        ("no ToastGeneric binding", 400),
        ("no text", 400),
        ("raw too large", 413),
        ("toast too large", 413),
        ("TTL not a number", 400),
        ("priority 5", 400),
        ("tag over 16", 400),
        ("group with a space", 400),
        ("SuppressPopup", 400),
        ("DELETE without match", 400),
        ("DELETE bad match", 400),
        ("DELETE match of tiles", 400),
    ],
)
def test_wns_refuses(
    wns: WnsStandIn, client: httpx.Client, wns_access: str, case: str, status: int
) -> None:
    channel = wns.new_channel()
    access: str | None = wns_access
    body: bytes | None = None
    headers: dict[str, str] = {}
    raw = {"x-wns-type": "wns/raw", "content-type": "application/octet-stream"}
    response: httpx.Response | None = None
    if case == "no token":
        access = None
    elif case == "expired token":
        access = wns_token(client, wns).json()["access_token"]
        wns.expire_tokens()
    elif case == "another app's token":
        client_id, secret = wns.add_app()
        other = wns_token(client, wns, client_id=client_id, client_secret=secret)
        access = other.json()["access_token"]
    elif case == "unknown channel":
        channel = f"{wns.url}/?token=AwYAAABnope"
    elif case == "gone":
        wns.gone(channel)
    elif case == "GET":
        response = client.get(channel, headers={"authorization": f"Bearer {access}"})
    elif case == "bad type":
        headers["x-wns-type"] = "wns/notification"
    elif case == "toast as octet-stream":
        headers["content-type"] = "application/octet-stream"
    elif case == "raw as text/xml":
        headers = {**raw, "content-type": "text/xml"}
    elif case == "malformed XML":
        body = b"<toast><visual>"
    elif case == "not a toast":
        body = b"<tile><visual/></tile>"
    elif case == "no ToastGeneric binding":
        body = toast_xml().replace(b"ToastGeneric", b"ToastText01")
    elif case == "no text":
        body = b'<toast><visual><binding template="ToastGeneric"/></visual></toast>'
    elif case == "raw too large":
        headers, body = raw, b"x" * 5001
    elif case == "toast too large":
        body = toast_xml({"body": "x" * 5000})
    elif case == "TTL not a number":
        headers["x-wns-ttl"] = "soon"
    elif case == "priority 5":
        headers["x-wns-priority"] = "5"
    elif case == "tag over 16":
        headers["x-wns-tag"] = "t" * 17
    elif case == "group with a space":
        headers["x-wns-group"] = "my orders"
    elif case == "SuppressPopup":
        headers["x-wns-suppresspopup"] = "true"
    elif case.startswith("DELETE"):
        match = {
            "DELETE without match": "",
            "DELETE bad match": "type:wns/toast;group",
            "DELETE match of tiles": "type:wns/tile;all",
        }[case]
        delete_headers = {"authorization": f"Bearer {access}"}
        if match:
            delete_headers["x-wns-match"] = match
        response = client.delete(channel, headers=delete_headers)
    if response is None:
        response = wns_post(client, channel, access, body, **headers)
    assert response.status_code == status, response.headers
    assert wns.accepted() == []
    assert wns.refused()[-1].status == status
    if status != 405:
        assert response.headers["x-wns-error-description"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


# -- the fault script, the record and the control API -------------------------------------------


def test_faults_answer_as_the_service_then_stop(
    apns: ApnsStandIn,
    fcm: FcmStandIn,
    wns: WnsStandIn,
    client: httpx.Client,
    fcm_token: str,
    wns_access: str,
) -> None:
    token, other = apns.new_token(), apns.new_token()
    apns.fault(429, 2, headers={"Retry-After": "2"}, target=token)
    apns.fault(503)
    first = apns_post(client, apns, other)  # the untargeted 503, not the token's 429
    assert (first.status_code, first.json()["reason"]) == (503, "ServiceUnavailable")
    for _ in range(2):
        response = apns_post(client, apns, token)
        assert (response.status_code, response.json()["reason"]) == (429, "TooManyRequests")
        assert response.headers["retry-after"] == "2"
    assert apns_post(client, apns, token).status_code == 200
    apns.fault(500, reason="InternalServerError")
    assert apns_post(client, apns, token).json()["reason"] == "InternalServerError"
    assert [r.fault for r in apns.refused()] == [True] * 4

    registration = fcm.new_token()
    message = {"token": registration, "data": {"a": "b"}}
    fcm.fault(429, headers={"Retry-After": "7"})
    fcm.fault(503)
    fcm.fault(500)
    for status, code in ((429, "QUOTA_EXCEEDED"), (503, "UNAVAILABLE"), (500, "INTERNAL")):
        response = fcm_send(client, fcm, fcm_token, message)
        assert response.status_code == status
        assert response.json()["error"]["details"][0]["errorCode"] == code
    fcm.fault(503, on="token")
    token_response = client.post(fcm.token_uri, content=b"grant_type=x")
    assert token_response.status_code == 503
    assert fcm_send(client, fcm, fcm_token, message).status_code == 200

    channel = wns.new_channel()
    wns.fault(406, headers={"Retry-After": "60"})
    response = wns_post(client, channel, wns_access)
    assert response.status_code == 406
    assert response.headers["x-wns-error-description"] and response.headers["retry-after"] == "60"
    wns.fault(503, count=None, target=channel)
    for _ in range(3):
        assert wns_post(client, channel, wns_access).status_code == 503
    wns.clear_faults()
    assert wns_post(client, channel, wns_access).status_code == 200


def test_delays_and_timeouts(apns: ApnsStandIn, tls: TlsFiles, client: httpx.Client) -> None:
    token = apns.new_token()
    apns.delay(0.3, target=token, count=1)
    started = time.monotonic()
    assert apns_post(client, apns, token).status_code == 200
    assert time.monotonic() - started >= 0.3
    apns.delay(2.0)
    with (
        httpx.Client(http2=True, verify=tls.client_context(), timeout=0.2) as impatient,
        pytest.raises(httpx.TimeoutException),
    ):
        apns_post(impatient, apns, token)
    deadline = time.monotonic() + 5
    while not [r for r in apns.refused() if r.reason == "ClientGone"]:
        assert time.monotonic() < deadline, apns.refused()
        time.sleep(0.02)
    assert len(apns.accepted()) == 1  # the timed-out push was not processed
    apns.delay(0)
    with pytest.raises(TimeoutError, match="1 of 2 messages accepted"):
        apns.wait_accepted(2, timeout=0.1)


async def test_wait_accepted_async(wp: WebPushStandIn, vapid: Vapid02, tls: TlsFiles) -> None:
    sub = wp.subscribe()
    headers, body = push_request(wp, sub, vapid)
    async with httpx.AsyncClient(http2=True, verify=tls.client_context()) as c:
        response = await c.post(sub["endpoint"], content=body, headers=headers)
    assert response.status_code == 201
    (delivery,) = await wp.wait_accepted_async(1, timeout=2, target=sub["endpoint"])
    assert delivery.message == MESSAGE


def test_a_stand_in_in_its_own_process(tmp_path: Path, vapid: Vapid02) -> None:
    with (
        spawn("webpush", tmp_path) as process,
        process.control() as control,
        requests.Session() as session,
    ):
        assert process.info["url"].startswith("https://127.0.0.1:")
        assert Path(process.info["ca_file"]).exists()
        subs = control.create(2)
        session.verify = str(process.ca_file)
        session.trust_env = False
        for sub in subs:
            response = webpush(
                sub,
                json.dumps(MESSAGE),
                vapid_private_key=vapid,
                vapid_claims={"sub": "mailto:ops@example.com"},
                ttl=60,
                requests_session=session,
            )
            assert response.status_code == 201
        control.fault(503, headers={"Retry-After": "1"}, target=subs[0]["endpoint"])
        with pytest.raises(Exception, match="503"):
            webpush(
                subs[0],
                "{}",
                vapid_private_key=vapid,
                vapid_claims={"sub": "mailto:ops@example.com"},
                requests_session=session,
            )
        stats = control.wait_accepted(2, timeout=5)
        assert (stats["accepted"], stats["refused"], stats["requests"]) == (2, 1, 3)
        accepted = control.accepted()
        assert [d["message"] for d in accepted] == [MESSAGE, MESSAGE]
        assert control.accepted(since=accepted[0]["seq"])[0]["seq"] == 2
        assert control.refused()[0]["status"] == 503
        with pytest.raises(TimeoutError):
            control.wait_accepted(3, timeout=0.1)
        control.reset()
        assert control.stats()["accepted"] == 0
    assert process.process.returncode == 0
