"""Web Push stand-in: RFC 8030 (push), RFC 8291 (aes128gcm message encryption), RFC 8292 (VAPID).

It plays both the push service and the browser: `subscribe()` makes a subscription the way a
user agent does (a P-256 key pair and a 16-byte auth secret, kept here), so every push is
decrypted and its JSON recorded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import http_ece
from cryptography.hazmat.primitives.asymmetric import ec

from tests.standins.base import SEND, Delivery, Fault, Refused, Request, Response, StandIn
from tests.standins.jws import Jwt, JwtError, b64url_decode, b64url_encode, p256_key, p256_point
from tests.standins.tls import TlsFiles

MAX_PAYLOAD = 4096  # RFC 8030 §7.2: a push service must accept at least 4096 octets
MAX_VAPID_EXP = 24 * 3600  # RFC 8292 §2: exp at most 24 hours after the request
MAX_TTL = 60 * 24 * 3600  # what the service keeps at most (answered in the TTL header)
URGENCIES = ("very-low", "low", "normal", "high")
TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
DIGITS = re.compile(r"[0-9]+")
PUSH_PATH = "/push/"

_PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    410: "Gone",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Subscriber:
    """A browser's push subscription: the private half stays with the stand-in."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: bytes | None  # a restricted subscription (RFC 8292 §4)

    @property
    def p256dh(self) -> str:
        return b64url_encode(p256_point(self.private_key.public_key()))

    def to_json(self) -> dict[str, Any]:
        """What the browser's PushSubscription.toJSON() gives (Herald's pushChannel)."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": self.p256dh, "auth": b64url_encode(self.auth)},
        }


def _error(status: int, reason: str, detail: str, errno: int = 999) -> Refused:
    """Refused with an autopush-style JSON error body."""
    body = {
        "code": status,
        "errno": errno,
        "error": _PHRASES.get(status, "Error"),
        "message": detail,
    }
    headers = [("www-authenticate", "vapid")] if status == 401 else []
    return Refused(Response.json(status, body, headers), reason, detail)


class WebPushStandIn(StandIn):
    """A push service for `subscribe()`d endpoints `<url>/push/<id>`.

    `vapid_key` (base64url public key, the app's applicationServerKey): subscriptions made
    without their own key are restricted to it, so pushes signed with another key get 403.
    `require_json`: refuse (400) a payload that does not decrypt to JSON (Herald's contract).
    """

    provider = "webpush"

    def __init__(
        self,
        tls: TlsFiles,
        *,
        vapid_key: str | None = None,
        require_json: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int | None = None,
    ) -> None:
        super().__init__(tls, host=host, port=port, keep=keep)
        self.vapid_key = None if vapid_key is None else _point(vapid_key)
        self.require_json = require_json
        self._lock = threading.Lock()
        self._subscribers: dict[str, Subscriber] = {}
        self._verified: dict[tuple[str, str], dict[str, Any]] = {}  # (t, k) -> claims

    # -- subscriptions

    def subscribe(self, application_server_key: str | bytes | None = None) -> dict[str, Any]:
        """A new subscription, as the browser's PushSubscription.toJSON():
        {"endpoint": ".../push/<id>", "expirationTime": None, "keys": {"p256dh", "auth"}}.
        `application_server_key` restricts it to that VAPID key (else the stand-in's)."""
        return self.subscriber(application_server_key).to_json()

    def subscriber(self, application_server_key: str | bytes | None = None) -> Subscriber:
        key = self.vapid_key
        if application_server_key is not None:
            key = (
                application_server_key
                if isinstance(application_server_key, bytes)
                else _point(application_server_key)
            )
        sid = secrets.token_urlsafe(32)
        sub = Subscriber(
            id=sid,
            endpoint=f"{self.url}{PUSH_PATH}{sid}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth=os.urandom(16),
            application_server_key=key,
        )
        with self._lock:
            self._subscribers[sid] = sub
        return sub

    def unsubscribe(self, target: str) -> None:
        """Forget a subscription: its endpoint answers 404 from now on (RFC 8030 §7.3)."""
        with self._lock:
            self._subscribers.pop(self.target_of(target), None)

    def create(self, **options: Any) -> Any:
        return self.subscribe(options.get("applicationServerKey"))

    def target_of(self, value: str) -> str:
        return value.rsplit(PUSH_PATH, 1)[1] if PUSH_PATH in value else value

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["vapid_key"] = None if self.vapid_key is None else b64url_encode(self.vapid_key)
        return info

    # -- the push service

    def route(self, req: Request) -> tuple[str, str | None]:
        if req.path.startswith(PUSH_PATH):
            return SEND, req.path[len(PUSH_PATH) :]
        return SEND, None

    def gone_refusal(self, target: str, status: int | None) -> Refused:
        status = status or 410
        return _error(status, "Gone", "push subscription has expired or was unsubscribed", 106)

    def fault_response(self, fault: Fault, on: str, target: str | None) -> Response:
        detail = fault.reason or _PHRASES.get(fault.status, "scripted fault")
        body = {
            "code": fault.status,
            "errno": 999,
            "error": _PHRASES.get(fault.status, "Error"),
            "message": detail,
        }
        return Response.json(fault.status, body, fault.headers.items())

    async def handle(self, req: Request, on: str, target: str | None) -> Response:
        if target is None or "/" in target:
            raise _error(404, "NotFound", f"no push resource at {req.path}", 102)
        if req.method != "POST":
            raise _error(405, "MethodNotAllowed", "push messages are sent with POST")
        with self._lock:
            sub = self._subscribers.get(target)
        if sub is None:
            raise _error(404, "NotFound", "no such push subscription", 102)
        self.check_gone(target)
        claims, key = self._vapid(req, sub)
        ttl = self._ttl(req)
        urgency = req.header("urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise _error(400, "BadUrgency", f"Urgency must be one of {URGENCIES}, not {urgency!r}")
        topic = req.header("topic")
        if topic is not None and not TOPIC.fullmatch(topic):
            detail = "Topic must be 1 to 32 characters of the base64url alphabet"
            raise _error(400, "BadTopic", detail)
        if len(req.body) > MAX_PAYLOAD:
            detail = f"the body is {len(req.body)} bytes; at most {MAX_PAYLOAD} are accepted"
            raise _error(413, "PayloadTooLarge", detail, 104)
        plaintext = self._decrypt(req, sub)
        payload: Any = plaintext
        if plaintext is not None:
            try:
                payload = json.loads(plaintext.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                if self.require_json:
                    raise _error(400, "NotJson", "the decrypted payload is not JSON") from None
        message_id = secrets.token_urlsafe(16)
        delivery = Delivery(
            provider=self.provider,
            target=target,
            kind="push",
            id=message_id,
            payload=payload,
            message=payload if isinstance(payload, dict) else None,
            headers=req.header_map(),
            details={
                "ttl": ttl,
                "urgency": urgency,
                "topic": topic,
                "vapid_sub": claims.get("sub"),
                "vapid_exp": claims.get("exp"),
                "vapid_key": key,
                "encrypted_size": len(req.body),
            },
            http_version=req.http_version,
        )
        self.journal.accept(delivery)
        return Response(
            201,
            headers=[
                ("location", f"{self.url}/m/{message_id}"),
                ("ttl", str(min(ttl, MAX_TTL))),
            ],
        )

    def _vapid(self, req: Request, sub: Subscriber) -> tuple[dict[str, Any], str]:
        """RFC 8292: the verified JWT claims and the key (k) that signed them."""
        if req.header_count("authorization") > 1:
            raise _error(400, "DuplicateAuthorization", "more than one Authorization header")
        auth = req.header("authorization")
        if auth is None:
            raise _error(401, "MissingAuthorization", "VAPID authentication is required", 109)
        scheme, _, rest = auth.strip().partition(" ")
        if scheme.lower() != "vapid":
            detail = f"the Authorization scheme must be 'vapid' (RFC 8292), not {scheme!r}"
            raise _error(401, "NotVapid", detail, 109)
        params: dict[str, str] = {}
        for part in rest.split(","):
            name, eq, value = part.strip().partition("=")
            if eq:
                params[name.strip().lower()] = value.strip()
        token, k = params.get("t"), params.get("k")
        if not token or not k:
            raise _error(401, "BadVapid", "the vapid scheme needs both t= and k=", 109)
        cached = self._verified.get((token, k))
        if cached is None:
            try:
                point = b64url_decode(k)
                public_key = p256_key(point)
            except ValueError as e:
                raise _error(403, "BadVapidKey", f"k is not a P-256 public key: {e}", 109) from e
            try:
                jwt = Jwt.parse(token)
                jwt.verify_es256(public_key)
            except JwtError as e:
                raise _error(403, "BadVapidToken", f"the VAPID JWT: {e}", 109) from e
            if jwt.claims.get("aud") != self.origin:
                detail = f"aud must be the push resource's origin {self.origin!r}"
                raise _error(403, "BadAudience", f"{detail}, not {jwt.claims.get('aud')!r}", 109)
            sub_claim = jwt.claims.get("sub")
            if not isinstance(sub_claim, str) or not (
                (sub_claim.startswith("mailto:") and len(sub_claim) > len("mailto:"))
                or (sub_claim.startswith("https://") and len(sub_claim) > len("https://"))
            ):
                detail = f"sub must be a mailto: or https: URL, not {sub_claim!r}"
                raise _error(403, "BadSubject", detail, 109)
            try:
                jwt.int_claim("exp")
            except JwtError as e:
                raise _error(403, "BadVapidToken", str(e), 109) from e
            cached = jwt.claims
            with self._lock:
                if len(self._verified) > 4096:
                    self._verified.clear()
                self._verified[(token, k)] = cached
            self.journal.count("vapid_tokens")
        now = time.time()
        exp = int(cached["exp"])
        if exp <= now:
            raise _error(403, "ExpiredVapidToken", "the VAPID JWT has expired", 109)
        if exp > now + MAX_VAPID_EXP:
            detail = "the VAPID JWT's exp is more than 24 hours ahead (RFC 8292 §2)"
            raise _error(403, "VapidExpTooFar", detail, 109)
        expected = sub.application_server_key
        if expected is not None and b64url_decode(k) != expected:
            detail = "the VAPID key is not the one the subscription was restricted to"
            raise _error(403, "VapidKeyMismatch", detail, 109)
        return cached, k

    def _ttl(self, req: Request) -> int:
        if req.header_count("ttl") > 1:
            raise _error(400, "BadTTL", "more than one TTL header", 111)
        ttl = req.header("ttl")
        if ttl is None:
            raise _error(400, "MissingTTL", "a TTL header is required (RFC 8030 §5.2)", 111)
        if not DIGITS.fullmatch(ttl.strip()):
            raise _error(400, "BadTTL", f"TTL must be a non-negative integer, not {ttl!r}", 111)
        return int(ttl)

    def _decrypt(self, req: Request, sub: Subscriber) -> bytes | None:
        """RFC 8291: the plaintext (None for a push without payload)."""
        encoding = req.header("content-encoding")
        if not req.body:
            if encoding is not None:
                raise _error(400, "BadEncryption", "Content-Encoding without a body", 110)
            return None
        if encoding is None:
            raise _error(400, "MissingContentEncoding", "a payload needs Content-Encoding", 110)
        if encoding.strip().lower() != "aes128gcm":
            detail = f"Content-Encoding must be aes128gcm (RFC 8291), not {encoding!r}"
            raise _error(415, "UnsupportedEncoding", detail, 110)
        body = req.body
        if len(body) < 21:
            raise _error(400, "BadEncryption", "shorter than an aes128gcm header", 110)
        rs = int.from_bytes(body[16:20], "big")
        idlen = body[20]
        keyid = body[21 : 21 + idlen]
        record = body[21 + idlen :]
        if idlen != 65 or keyid[:1] != b"\x04":
            detail = "keyid must be the sender's 65-byte uncompressed P-256 key (RFC 8291 §4)"
            raise _error(400, "BadEncryption", detail, 110)
        if rs < 18 or len(record) > rs:
            detail = f"a push message is a single record (rs={rs}, record {len(record)} bytes)"
            raise _error(400, "BadEncryption", detail, 110)
        try:
            plaintext: bytes = http_ece.decrypt(
                body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm"
            )
        except Exception as e:  # http_ece raises ECEException, ValueError, struct.error, ...
            detail = f"the payload does not decrypt with the subscription's keys: {e}"
            raise _error(400, "DecryptionFailed", detail, 110) from e
        return plaintext


def _point(b64: str) -> bytes:
    point = b64url_decode(b64)
    p256_key(point)  # ValueError if it is not a P-256 public key
    return point
