"""APNs: HTTP/2 with token authentication (an ES256 JWT from the app's `.p8` key).

Visual alerts are `alert` pushes; raw content, state syncs and removals are `background` pushes
(`content-available`, priority 5, as Apple requires). The JWT is renewed every 40 minutes (Apple
refuses tokens older than an hour, and renewing more often than every 20 minutes).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from herald import fields
from herald.errors import InvalidRequest
from herald.model import ApnsChannel, Message, Priority, PushChannel, PushKind
from herald.outbound.providers.clients import Answer, client, exchange
from herald.outbound.providers.document import shortened
from herald.outbound.providers.keyring import Keyring
from herald.outbound.providers.sender import (
    Outcome,
    Result,
    by_status,
    failure,
    missing,
    retry_after,
)
from herald.outbound.providers.table import FIELD, Credentials, Entry, Option, Unusable
from herald.settings import Settings

KIND = "apns"
LIMIT = 4096
TOKEN = re.compile(r"[0-9a-fA-F]{64,200}")
TOKEN_LIFETIME = 40 * 60
# Answers that mean Herald's configuration is wrong for the app (its topic, its environment, the
# URL), not that the device went away: reported loudly and retried, never marking devices gone.
CONFIGURATION_REASONS = {"DeviceTokenNotForTopic", "TopicDisallowed", "BadTopic", "MissingTopic"}


class ApnsCredentials(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    team_id: str
    private_key: str  # the .p8 file: a PKCS#8 PEM P-256 key
    topic: str  # the app's bundle id
    environment: str = "production"  # or "development" (the sandbox host)


def check(creds: ApnsCredentials) -> None:
    """Raise ValueError if the key cannot sign (caught by the CLI before it is stored)."""
    if creds.environment not in ("production", "development"):
        raise ValueError("environment must be production or development")
    try:
        key = serialization.load_pem_private_key(creds.private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("APNs keys are P-256 (ES256) private keys")


def render(message: Message) -> tuple[dict[str, str], bytes]:
    """(headers, body) for one message (pure: no credentials, no clock)."""
    alert = message.kind in (PushKind.ALERT, PushKind.FALLBACK) and (
        message.payload is not None and message.payload.visual_content is not None
    )
    headers = {
        "apns-push-type": "alert" if alert else "background",
        "apns-priority": "5" if not alert or message.priority is Priority.LOW else "10",
        "apns-expiration": str(int(message.expires.timestamp())),
        "apns-collapse-id": _collapse(message.notification_id),
    }
    for doc in shortened(message):  # down to a shoulder tap; a visual alert keeps `aps`
        body = _body(message, alert, doc)
        if len(body) <= LIMIT:
            return headers, body
    # The alert text alone is too long: shorten its body.
    return headers, _body(message, alert, doc, cut=len(body) - LIMIT)


def _body(message: Message, alert: bool, doc: dict[str, Any], cut: int = 0) -> bytes:
    aps: dict[str, Any]
    if alert and message.payload is not None and message.payload.visual_content is not None:
        visual = message.payload.visual_content
        content: dict[str, str] = {"title": visual.title}
        if visual.body is not None:
            content["body"] = visual.body
            if cut:  # a few bytes more: a cut character's JSON escape may be longer than it
                text = visual.body.encode()
                content["body"] = text[: max(0, len(text) - cut - 8)].decode(errors="ignore")
        aps = {"alert": content, "sound": "default"}
        if message.group_name is not None:
            aps["thread-id"] = message.group_name
    else:
        aps = {"content-available": 1}
    return msgspec.json.encode({"aps": aps, "herald": doc})


def _collapse(notification_id: str) -> str:
    raw = notification_id.encode()
    return notification_id if len(raw) <= 64 else hashlib.sha256(raw).hexdigest()


class Apns:
    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        self.keyring = keyring
        # HTTP/2, which only httpx speaks (see clients.Http1)
        self.http = client(settings.push_ca_file, settings.push_timeout, http2=True)
        self.hosts = {
            "production": settings.push_apns_production_url.rstrip("/"),
            "development": settings.push_apns_development_url.rstrip("/"),
        }
        self.tokens: dict[str, tuple[float, str, bytes]] = {}  # app -> (renew at, jwt, creds)

    async def send(self, app: str, channel: PushChannel, message: Message) -> Outcome:
        if not isinstance(channel, ApnsChannel):
            return Outcome(Result.REJECTED, "not an APNs channel")
        raw = await self.keyring.get(app, KIND)
        if raw is None:
            return missing("APNs", app)
        try:
            creds = msgspec.json.decode(raw, type=ApnsCredentials)
            token = self.token(app, creds, raw)
        except (msgspec.DecodeError, JoseError, ValueError) as exc:
            self.keyring.forget(app)
            return Outcome(
                Result.RETRY, f"unusable APNs key: {type(exc).__name__}", credentials=True
            )
        headers, body = render(message)
        headers["authorization"] = f"bearer {token}"
        headers["apns-topic"] = creds.topic
        url = f"{self.hosts[creds.environment]}/3/device/{channel.device_token}"
        try:
            response = await exchange(self.http, "POST", url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return failure(exc)
        return self.outcome(app, response)

    def outcome(self, app: str, response: Answer) -> Outcome:
        status = response.status_code
        if status == 200:
            return by_status(status, response.headers, "")
        try:
            reason = str(msgspec.json.decode(response.content).get("reason", ""))
        except (msgspec.DecodeError, AttributeError):
            reason = ""
        text = f"HTTP {status}" + (f": {reason}" if reason else "")
        if reason == "Unregistered" or status == 410:
            return Outcome(Result.GONE, text, status=status)
        if reason == "BadDeviceToken":  # also what a sandbox token sent to production gets
            return Outcome(Result.REJECTED, f"{text} (or a token of the other environment)")
        if reason in CONFIGURATION_REASONS or status == 404:
            return Outcome(Result.RETRY, text, credentials=True, status=status)
        if reason == "ExpiredProviderToken":  # renew the token and try again soon
            self.tokens.pop(app, None)
            return Outcome(Result.RETRY, text, retry_after(response.headers), status=status)
        if status == 403:
            self.tokens.pop(app, None)
            self.keyring.forget(app)
        if reason == "PayloadTooLarge":
            return Outcome(Result.REJECTED, text, status=status)
        return by_status(status, response.headers, text)

    def token(self, app: str, creds: ApnsCredentials, raw: bytes) -> str:
        now = time.time()
        cached = self.tokens.get(app)
        if cached is not None and cached[0] > now and cached[2] == raw:
            return cached[1]
        key = ECKey.import_key(creds.private_key)
        token = jwt.encode(
            {"alg": "ES256", "kid": creds.key_id}, {"iss": creds.team_id, "iat": int(now)}, key
        )
        self.tokens[app] = (now + TOKEN_LIFETIME, token, raw)
        return token

    async def close(self) -> None:
        await self.http.aclose()


# -- registration --------------------------------------------------------------------------------


def parse(value: Any, settings: Settings) -> ApnsChannel:
    body = fields.members(value, FIELD, {"deviceToken"})
    name = f"{FIELD}.deviceToken"
    token = fields.required(body.get("deviceToken"), name, 200)
    if not TOKEN.fullmatch(token):
        raise InvalidRequest(f"'{name}' must be 64 to 200 hex digits.", target=name)
    return ApnsChannel(token.lower())


def load(values: Mapping[str, Any]) -> bytes:
    creds = ApnsCredentials(
        key_id=values["key_id"],
        team_id=values["team_id"],
        private_key=Path(values["key_file"]).read_text(),
        topic=values["topic"],
        environment=values["environment"],
    )
    try:
        check(creds)
    except ValueError as exc:
        raise Unusable(f"not a usable .p8 key: {exc}", "--key-file") from exc
    return msgspec.json.encode(creds)


def describe(stored: bytes) -> dict[str, Any]:
    a = msgspec.json.decode(stored, type=ApnsCredentials)
    return {"keyId": a.key_id, "teamId": a.team_id, "topic": a.topic, "environment": a.environment}


SUMMARY = "APNs token authentication."
OPTIONS = (
    Option("--key-file", "The .p8 signing key from Apple.", file=True),
    Option("--key-id", "The key's id (10 characters)."),
    Option("--team-id", "The Apple developer team id."),
    Option("--topic", "The app's bundle id."),
    Option(
        "--environment",
        "Which APNs: production, or development (the sandbox).",
        choices=("production", "development"),
        default="production",
    ),
)
CREDENTIALS = Credentials(KIND, SUMMARY, OPTIONS, load, describe)
ENTRY = Entry(channel=ApnsChannel, parse=parse, credentials=CREDENTIALS, sender=Apns)
