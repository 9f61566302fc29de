"""APNs stand-in: the HTTP/2 provider API with token (JWT) authentication.

Configure Herald with `key_pem` (write_key() writes AuthKey_<KEYID>.p8), `key_id`, `team_id`
and `topic`; register device tokens with `new_token()`. Every rule the service applies to a
request is checked, with Apple's status codes and `reason` words.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.standins.base import SEND, Delivery, Fault, Refused, Request, Response, StandIn
from tests.standins.jws import Jwt, JwtError
from tests.standins.tls import TlsFiles

DEVICE_PATH = "/3/device/"
MAX_PAYLOAD = 4096  # every push type Herald sends (VoIP would be 5120)
TOKEN_MAX_AGE = 3600  # a provider token is refused an hour after its iat
CLOCK_SKEW = 60
DEVICE_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2}){32,100}")
APNS_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
DIGITS = re.compile(r"[0-9]+")
PUSH_TYPES = ("alert", "background")
PRIORITIES = ("10", "5", "1")
UNIQUE_HEADERS = (
    "authorization",
    "apns-topic",
    "apns-push-type",
    "apns-priority",
    "apns-expiration",
    "apns-collapse-id",
    "apns-id",
)
FAULT_REASONS = {
    400: "BadDeviceToken",
    403: "InvalidProviderToken",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey


def _refuse(status: int, reason: str, detail: str) -> Refused:
    body: dict[str, Any] = {"reason": reason}
    if status == 410:
        body["timestamp"] = int(time.time() * 1000)
    return Refused(Response.json(status, body), reason, detail)


def _key_id() -> str:
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))


class ApnsStandIn(StandIn):
    """api.push.apple.com for one team: POST /3/device/<token> over HTTP/2 only.

    `environment` "development" adds the apns-unique-id response header as the sandbox does.
    `min_token_interval` (seconds, 0 = off; Apple's is 1200): a new provider token for a key
    sooner than that after the previous one is refused 429 TooManyProviderTokenUpdates.
    """

    provider = "apns"

    def __init__(
        self,
        tls: TlsFiles,
        *,
        team_id: str = "HERALDTEAM",
        topic: str = "com.example.herald",
        key_id: str | None = None,
        environment: str = "development",
        min_token_interval: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int | None = None,
    ) -> None:
        super().__init__(tls, host=host, port=port, keep=keep)
        self.team_id = team_id
        self.topic = topic
        self.environment = environment
        self.min_token_interval = min_token_interval
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = key_id or _key_id()
        self._lock = threading.Lock()
        self._keys: dict[str, SigningKey] = {
            self.key_id: SigningKey(self.key_id, team_id, self.private_key.public_key())
        }
        self._topics: dict[str, str] = {topic: team_id}  # topic -> team
        self._devices: dict[str, str] = {}  # device token -> topic
        self._verified: dict[str, tuple[str, int]] = {}  # provider token -> (key id, iat)
        self._expired: set[str] = set()  # provider tokens declared expired
        self._last_token: dict[str, tuple[str, int]] = {}  # key id -> (token, iat)

    # -- credentials and devices

    @property
    def key_pem(self) -> str:
        """The signing key as Apple hands it out (.p8: PKCS#8 PEM)."""
        return _pkcs8(self.private_key)

    def write_key(self, directory: Path | str) -> Path:
        """Write AuthKey_<KEYID>.p8 into `directory`; its path (herald --key-file)."""
        path = Path(directory) / f"AuthKey_{self.key_id}.p8"
        path.write_text(self.key_pem)
        path.chmod(0o600)
        return path

    def add_key(self, team_id: str | None = None, key_id: str | None = None) -> tuple[str, str]:
        """Another signing key (of `team_id`, default this team): (key id, .p8 PEM)."""
        private = ec.generate_private_key(ec.SECP256R1())
        kid = key_id or _key_id()
        with self._lock:
            self._keys[kid] = SigningKey(kid, team_id or self.team_id, private.public_key())
        return kid, _pkcs8(private)

    def revoke_key(self, key_id: str) -> None:
        """Revoke a signing key: tokens it signs are InvalidProviderToken from now on."""
        with self._lock:
            self._keys.pop(key_id, None)
            self._verified.clear()

    def add_topic(self, topic: str, team_id: str | None = None) -> None:
        with self._lock:
            self._topics[topic] = team_id or self.team_id

    def new_token(self, topic: str | None = None) -> str:
        """A device token (64 hex digits) registered for `topic` (default: the app's)."""
        token = secrets.token_hex(32)
        self.register_token(token, topic)
        return token

    def register_token(self, token: str, topic: str | None = None) -> None:
        with self._lock:
            self._devices[token.lower()] = topic or self.topic

    def expire_provider_tokens(self) -> None:
        """Every provider token seen so far is refused 403 ExpiredProviderToken from now on
        (as APNs may do before the hour is up); a freshly signed one is accepted."""
        with self._lock:
            self._expired.update(self._verified)
            self._verified.clear()

    def create(self, **options: Any) -> Any:
        return self.new_token(options.get("topic"))

    def target_of(self, value: str) -> str:
        return value.rsplit("/", 1)[-1].lower()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(
            team_id=self.team_id,
            key_id=self.key_id,
            topic=self.topic,
            environment=self.environment,
        )
        return info

    def write_credentials(self, directory: Path) -> dict[str, Any]:
        return {"key_file": str(self.write_key(directory))}

    def control_extra(self, name: str, body: dict[str, Any]) -> Response | None:
        if name == "expire-provider-tokens":
            self.expire_provider_tokens()
            return Response.json(200, {"ok": True})
        return None

    # -- the service

    def route(self, req: Request) -> tuple[str, str | None]:
        if req.path.startswith(DEVICE_PATH):
            return SEND, req.path[len(DEVICE_PATH) :].lower()
        return SEND, None

    def gone_refusal(self, target: str, status: int | None) -> Refused:
        return _refuse(status or 410, "Unregistered", "the device token is no longer active")

    def fault_response(self, fault: Fault, on: str, target: str | None) -> Response:
        reason = fault.reason or FAULT_REASONS.get(fault.status, "InternalServerError")
        body: dict[str, Any] = {"reason": reason}
        if fault.status == 410:
            body["timestamp"] = int(time.time() * 1000)
        headers = [("apns-id", str(uuid.uuid4())), *fault.headers.items()]
        return Response.json(fault.status, body, headers)

    async def handle(self, req: Request, on: str, target: str | None) -> Response:
        try:
            return self._handle(req, target)
        except Refused as r:
            if req.http_version == "2":  # APNs answers every request with its apns-id
                given = req.header("apns-id")
                apns_id = given if given and APNS_ID.fullmatch(given) else str(uuid.uuid4())
                r.response.headers.append(("apns-id", apns_id))
            raise

    def _handle(self, req: Request, target: str | None) -> Response:
        if req.http_version != "2":
            # APNs offers only h2; an HTTP/1.1 request never gets an answer from it.
            detail = f"HTTP/{req.http_version}: APNs speaks only HTTP/2"
            raise Refused(Response(505, detail.encode()), "HTTP/1.1", detail)
        if req.method != "POST":
            raise _refuse(405, "MethodNotAllowed", f"{req.method}: only POST is supported")
        if target is None or "/" in target:
            raise _refuse(404, "BadPath", f"no such path {req.path}")
        if not target:
            raise _refuse(400, "MissingDeviceToken", "no device token in the path")
        for name in UNIQUE_HEADERS:
            if req.header_count(name) > 1:
                raise _refuse(400, "DuplicateHeaders", f"{name} appears more than once")
        team = self._authenticate(req)
        topic = self._topic(req, team)
        if not DEVICE_TOKEN.fullmatch(target):
            raise _refuse(400, "BadDeviceToken", "a device token is 64 or more hex digits")
        with self._lock:
            registered = self._devices.get(target)
        if registered is None:
            detail = "the token was not issued for this environment (register it first)"
            raise _refuse(400, "BadDeviceToken", detail)
        if registered != topic:
            detail = f"the token belongs to {registered!r}, not {topic!r}"
            raise _refuse(400, "DeviceTokenNotForTopic", detail)
        self.check_gone(target)

        push_type = req.header("apns-push-type")
        if push_type not in PUSH_TYPES:
            detail = f"apns-push-type must be one of {PUSH_TYPES}, not {push_type!r}"
            raise _refuse(400, "InvalidPushType", detail)
        priority = req.header("apns-priority")
        if priority is not None and priority not in PRIORITIES:
            raise _refuse(400, "BadPriority", f"apns-priority {priority!r} is not 10, 5 or 1")
        if push_type == "background" and priority != "5":
            detail = "a background push must have apns-priority 5"
            raise _refuse(400, "BadPriority", detail)
        expiration = req.header("apns-expiration")
        if expiration is not None and not DIGITS.fullmatch(expiration):
            detail = f"apns-expiration must be a UNIX time in seconds, not {expiration!r}"
            raise _refuse(400, "BadExpirationDate", detail)
        collapse_id = req.header("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode("latin-1")) > 64:
            raise _refuse(400, "BadCollapseId", "apns-collapse-id is over 64 bytes")
        apns_id = req.header("apns-id")
        if apns_id is not None and not APNS_ID.fullmatch(apns_id):
            raise _refuse(400, "BadMessageId", f"apns-id {apns_id!r} is not a UUID")

        payload = self._payload(req, push_type)
        aps: dict[str, Any] = payload["aps"]
        answer_id = apns_id or str(uuid.uuid4())
        delivery = Delivery(
            provider=self.provider,
            target=target,
            kind=push_type,
            id=answer_id,
            payload=payload,
            message=payload.get("herald"),
            headers=req.header_map(),
            details={
                "topic": topic,
                "priority": int(priority or "10"),
                "expiration": None if expiration is None else int(expiration),
                "collapse_id": collapse_id,
                "thread_id": aps.get("thread-id"),
                "alert": aps.get("alert"),
                "content_available": aps.get("content-available"),
            },
            http_version=req.http_version,
        )
        self.journal.accept(delivery)
        headers = [("apns-id", answer_id)]
        if self.environment == "development":
            headers.append(("apns-unique-id", str(uuid.uuid4())))
        return Response(200, headers=headers)

    def _authenticate(self, req: Request) -> str:
        """Verify the provider token; its team."""
        auth = req.header("authorization")
        if auth is None:
            raise _refuse(403, "MissingProviderToken", "no authorization header")
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _refuse(403, "MissingProviderToken", "authorization must be 'bearer <JWT>'")
        now = time.time()
        with self._lock:
            if token in self._expired:
                raise _refuse(403, "ExpiredProviderToken", "the provider token was expired")
            known = self._verified.get(token)
        if known is None:
            known = self._verify(token, now)
        key_id, iat = known
        if iat < now - TOKEN_MAX_AGE:
            raise _refuse(403, "ExpiredProviderToken", "the provider token is over an hour old")
        with self._lock:
            key = self._keys.get(key_id)
        if key is None:
            raise _refuse(403, "InvalidProviderToken", f"key {key_id} was revoked")
        return key.team_id

    def _verify(self, token: str, now: float) -> tuple[str, int]:
        try:
            jwt = Jwt.parse(token)
        except JwtError as e:
            raise _refuse(403, "InvalidProviderToken", str(e)) from e
        if jwt.header.get("alg") != "ES256":
            detail = f"alg must be ES256, not {jwt.header.get('alg')!r}"
            raise _refuse(403, "InvalidProviderToken", detail)
        kid = jwt.header.get("kid")
        with self._lock:
            key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise _refuse(403, "InvalidProviderToken", f"no signing key {kid!r}")
        try:
            jwt.verify_es256(key.public_key)
            iat = jwt.int_claim("iat")
        except JwtError as e:
            raise _refuse(403, "InvalidProviderToken", str(e)) from e
        if jwt.claims.get("iss") != key.team_id:
            detail = f"iss must be the key's team {key.team_id!r}, not {jwt.claims.get('iss')!r}"
            raise _refuse(403, "InvalidProviderToken", detail)
        if iat > now + CLOCK_SKEW:
            raise _refuse(403, "InvalidProviderToken", "iat is in the future")
        if iat < now - TOKEN_MAX_AGE:
            raise _refuse(403, "ExpiredProviderToken", "the provider token is over an hour old")
        with self._lock:
            last = self._last_token.get(key.key_id)
            if (
                self.min_token_interval > 0
                and last is not None
                and last[0] != token
                and iat - last[1] < self.min_token_interval
            ):
                detail = f"a new provider token {iat - last[1]}s after the previous one"
                raise _refuse(429, "TooManyProviderTokenUpdates", detail)
            self._last_token[key.key_id] = (token, iat)
            if len(self._verified) > 4096:
                self._verified.clear()
            self._verified[token] = (key.key_id, iat)
        self.journal.count("provider_tokens")
        return key.key_id, iat

    def _topic(self, req: Request, team: str) -> str:
        topic = req.header("apns-topic")
        if topic is None or not topic.strip():
            raise _refuse(400, "MissingTopic", "apns-topic is required with token authentication")
        if not TOPIC.fullmatch(topic):
            raise _refuse(400, "BadTopic", f"apns-topic {topic!r} is not a bundle id")
        with self._lock:
            owner = self._topics.get(topic)
        if owner != team:
            raise _refuse(400, "TopicDisallowed", f"team {team} may not push to {topic!r}")
        return topic

    def _payload(self, req: Request, push_type: str) -> dict[str, Any]:
        if not req.body:
            raise _refuse(400, "PayloadEmpty", "the payload is empty")
        if len(req.body) > MAX_PAYLOAD:
            detail = f"the payload is {len(req.body)} bytes; at most {MAX_PAYLOAD}"
            raise _refuse(413, "PayloadTooLarge", detail)
        try:
            payload = json.loads(req.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            # Apple documents no reason word for this; the stand-in uses its own.
            raise _refuse(400, "BadPayload", f"the payload is not JSON: {e}") from e
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            raise _refuse(400, "BadPayload", "the payload must be an object with an aps object")
        aps: dict[str, Any] = payload["aps"]
        if push_type == "alert" and not isinstance(aps.get("alert"), str | dict):
            raise _refuse(400, "InvalidPushType", "an alert push needs aps.alert")
        if push_type == "background":
            if aps.get("content-available") != 1:
                detail = "a background push needs aps.content-available: 1"
                raise _refuse(400, "InvalidPushType", detail)
            shown = sorted({"alert", "sound", "badge"} & set(aps))
            if shown:
                detail = f"a background push must not have aps.{', aps.'.join(shown)}"
                raise _refuse(400, "InvalidPushType", detail)
        return payload


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
