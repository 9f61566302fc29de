"""Web Push: RFC 8030 delivery, RFC 8291 `aes128gcm` payload encryption, RFC 8292 VAPID.

VAPID tokens are signed with the web-push-libs' `py_vapid`; the payload is encrypted with
`cryptography`'s primitives, as the web-push-libs' `http_ece` does it (see `encrypt`). Each app
has its own VAPID key pair (generated on first use, kept in the store); browsers subscribe with
its public key as `applicationServerKey`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from py_vapid import Vapid02

import herald.outbound.providers.guard as guard
from herald import fields
from herald.errors import InvalidRequest
from herald.model import Message, Priority, PushChannel, PushKind, WebPushChannel, WebPushKeys
from herald.outbound.providers.clients import Http1, exchange, tls_context
from herald.outbound.providers.document import fitted, seconds_left
from herald.outbound.providers.keyring import Keyring
from herald.outbound.providers.sender import Outcome, Result, by_status, failure
from herald.outbound.providers.table import FIELD, Credentials, Entry, Option, Unusable
from herald.settings import DEFAULT_VAPID_SUBJECT, Settings

log = logging.getLogger("herald.push")

KIND = "vapid"
LIMIT = 4096  # bytes of encrypted body every push service accepts
# aes128gcm with one record: salt 16 + rs 4 + idlen 1 + key 65 header, 16 tag, 1 delimiter.
OVERHEAD = 86 + 16 + 1
MAX_TTL = 28 * 86_400
MAX_TOKENS = 10_000  # cached VAPID headers, one per (app, push service origin)
JWT_LIFETIME = 12 * 3600  # RFC 8292 allows up to 24 h; renewed at half-life
URGENCY = {Priority.HIGH: "high", Priority.NONE: "normal", Priority.LOW: "low"}


def generate_key() -> bytes:
    """A new VAPID private key (PKCS#8 PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key(pem: bytes) -> str:
    """The browser's `applicationServerKey`: the uncompressed point, base64url, no padding."""
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(point).decode().rstrip("=")


def topic(notification_id: str) -> str:
    """`Topic` (at most 32 base64url characters): a replace keeps the id, so it collapses."""
    digest = hashlib.sha256(notification_id.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


def _b64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


MAX_KEYS = 10_000  # subscribers' decoded keys kept (a dict, cleared when full)
_keys: dict[WebPushKeys, tuple[ec.EllipticCurvePublicKey, bytes, bytes]] = {}


def subscriber(keys: WebPushKeys) -> tuple[ec.EllipticCurvePublicKey, bytes, bytes]:
    """The subscriber's public key, auth secret and the key info's first part ("WebPush:
    info", a zero byte, its key), made once (a point's decoding and check cost a tenth of an
    encryption)."""
    found = _keys.get(keys)
    if found is None:
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _b64(keys.p256dh))
        if len(_keys) >= MAX_KEYS:
            _keys.clear()
        info = b"WebPush: info\x00" + point.public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )
        found = _keys[keys] = (point, _b64(keys.auth), info)
    return found


def encrypt(body: bytes, channel: WebPushChannel) -> bytes:
    """RFC 8291 `aes128gcm` in one record, with a fresh ECDH key and salt per message.

    The same steps as `http_ece.encrypt(body, salt=…, private_key=…, dh=…, auth_secret=…,
    version="aes128gcm")` (which the Web Push stand-in decrypts every push with), made with
    `cryptography`'s primitives directly: the library's generic path (three HKDF objects, a
    Cipher object, byte concatenations, its checks for other versions) cost as much again as
    the cryptography itself (benchmarks/README.md, "push.py").
    """
    peer, auth, info = subscriber(channel.keys)
    key = ec.generate_private_key(ec.SECP256R1())
    ours = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    secret = key.exchange(ec.ECDH(), peer)
    salt = os.urandom(16)
    # HKDF (RFC 5869) with SHA-256, one block each: extract, then expand with counter 1.
    ikm = hmac.digest(hmac.digest(auth, secret, "sha256"), info + ours + b"\x01", "sha256")
    prk = hmac.digest(salt, ikm, "sha256")
    cek = hmac.digest(prk, b"Content-Encoding: aes128gcm\x00\x01", "sha256")[:16]
    nonce = hmac.digest(prk, b"Content-Encoding: nonce\x00\x01", "sha256")[:12]
    sealed = AESGCM(cek).encrypt(nonce, body + b"\x02", None)  # 0x02: the last record
    return salt + RECORD_SIZE + bytes((len(ours),)) + ours + sealed


RECORD_SIZE = (4096).to_bytes(4, "big")  # the header's `rs`, as http_ece writes it


class WebPush:
    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        private = settings.push_allow_private_endpoints
        self.keyring = keyring
        self.http = Http1(
            tls_context(settings.push_ca_file), settings.push_timeout, public_only=not private
        )
        self.subject = settings.vapid_subject
        self.guard = guard.Guard(private)
        self.warned = False  # about the default VAPID subject, once
        # (app, audience) -> (renew at, Authorization header)
        self.tokens: dict[tuple[str, str], tuple[float, str]] = {}
        self.signers: dict[bytes, Vapid02] = {}

    async def send(self, app: str, channel: PushChannel, message: Message) -> Outcome:
        if not isinstance(channel, WebPushChannel):
            return Outcome(Result.REJECTED, "not a Web Push channel")
        if message.kind is not PushKind.ALERT:
            return Outcome(Result.REJECTED, f"Web Push does not carry {message.kind} messages")
        if not await self.guard.allowed(channel.endpoint):
            return Outcome(Result.REJECTED, "the endpoint resolves to a private address")
        headers = {
            "TTL": str(seconds_left(message.expires, MAX_TTL)),
            "Urgency": URGENCY[message.priority],
            "Topic": topic(message.notification_id),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": await self.authorization(app, channel.endpoint),
        }
        try:
            body = encrypt(fitted(message, LIMIT, OVERHEAD), channel)
        except ValueError:  # registered before the API checked points
            return Outcome(Result.REJECTED, "the subscription's p256dh key is not a P-256 point")
        try:
            response = await exchange(
                self.http, "POST", channel.endpoint, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            return failure(exc)
        if response.status_code in (401, 403):
            self.tokens.pop((app, _audience(channel.endpoint)), None)
            self.keyring.forget(app)
        status = response.status_code
        if status == 403:  # this subscription was made with another key (RFC 8292 §4.2)
            return Outcome(Result.REJECTED, "HTTP 403: VAPID key refused for this subscription")
        if status == 401:  # the endpoint is the device's choice: no alarm for the operator
            return Outcome(Result.REJECTED, "HTTP 401: VAPID token refused")
        # Only the status: the endpoint is the device's choice, and its answer is shown back.
        return by_status(status, response.headers, f"HTTP {status}")

    async def authorization(self, app: str, endpoint: str) -> str:
        audience = _audience(endpoint)
        now = time.time()
        cached = self.tokens.get((app, audience))
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.subject == DEFAULT_VAPID_SUBJECT and not self.warned:
            self.warned = True
            log.warning(
                "push_vapid_subject is not set: Web Push uses %s, which Apple's push service "
                "refuses; set it to a mailto: or https: URL that reaches you",
                DEFAULT_VAPID_SUBJECT,
            )
        pem = await self.keyring.ensure(app, KIND, generate_key)
        signer = self.signers.get(pem)
        if signer is None:
            signer = self.signers[pem] = Vapid02.from_pem(pem)
        claims = {"aud": audience, "exp": int(now) + JWT_LIFETIME, "sub": self.subject}
        header = str(signer.sign(claims)["Authorization"])
        if len(self.tokens) >= MAX_TOKENS:  # audiences are the devices' choice: keep it bounded
            self.tokens.clear()
        self.tokens[(app, audience)] = (now + JWT_LIFETIME / 2, header)
        return header

    async def close(self) -> None:
        await self.http.aclose()


def _audience(endpoint: str) -> str:
    """The push service's origin (the VAPID `aud`), worked out once per endpoint."""
    found = _audiences.get(endpoint)
    if found is None:
        parts = urlsplit(endpoint)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        found = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
        if len(_audiences) >= MAX_KEYS:
            _audiences.clear()
        _audiences[endpoint] = found
    return found


_audiences: dict[str, str] = {}


# -- registration --------------------------------------------------------------------------------


def parse(value: Any, settings: Settings) -> WebPushChannel:
    """A browser's PushSubscription. A point off the curve could never be encrypted to; an
    endpoint on a private network is refused unless the operator allows them (see guard.py)."""
    body = fields.members(value, FIELD, {"endpoint", "keys", "expirationTime"})
    keys = fields.members(body.get("keys"), f"{FIELD}.keys", {"p256dh", "auth"})
    p256dh = fields.base64url(keys.get("p256dh"), f"{FIELD}.keys.p256dh", 65)
    try:
        point = _b64(p256dh)
        if point[0] != 4:
            raise ValueError("compressed")
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise InvalidRequest(
            f"'{FIELD}.keys.p256dh' must be an uncompressed P-256 point.",
            target=f"{FIELD}.keys.p256dh",
        ) from None
    auth = fields.base64url(keys.get("auth"), f"{FIELD}.keys.auth", 16)
    endpoint = fields.https_url(body.get("endpoint"), f"{FIELD}.endpoint")
    literal = guard.literal_host(endpoint)
    private = literal is not None and not guard.public_address(literal)
    if private and not settings.push_allow_private_endpoints:
        raise InvalidRequest(
            f"'{FIELD}.endpoint' must be a public push service, not a private address.",
            target=f"{FIELD}.endpoint",
        )
    return WebPushChannel(endpoint, WebPushKeys(p256dh, auth))


def load(values: Mapping[str, Any]) -> bytes:
    pem = Path(values["key_file"]).read_bytes()
    try:
        public_key(pem)
    except (ValueError, TypeError, AssertionError) as exc:
        raise Unusable("not a P-256 private key (PEM)", "--key-file") from exc
    return pem


def describe(stored: bytes) -> dict[str, Any]:
    return {"applicationServerKey": public_key(stored)}


SUMMARY = (
    "Replace the app's VAPID key (existing browser subscriptions stop working unless they were "
    "made with this key)."
)
OPTIONS = (
    Option(
        "--key-file",
        "An existing VAPID private key (PEM), e.g. from another server.",
        file=True,
    ),
)
CREDENTIALS = Credentials(KIND, SUMMARY, OPTIONS, load, describe)
ENTRY = Entry(
    channel=WebPushChannel, parse=parse, credentials=CREDENTIALS, sender=WebPush, silent=False
)
