"""FCM HTTP v1: `messages:send` with an OAuth 2.0 access token from the app's service account.

google-auth does the OAuth part (the JWT bearer grant against the account's `token_uri`) over
its transport interface, which `_Transport` implements with a synchronous httpx client trusting
the same CAs as every push request (the system's plus `push_ca_file`); a refresh, about once an
hour per app, runs in a thread. Visual alerts are notification messages; everything else is a
data message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import google.auth.exceptions
import google.auth.transport
import httpx
import msgspec
from google.oauth2 import service_account

from herald import fields
from herald.errors import InvalidRequest
from herald.model import FcmChannel, Message, Priority, PushChannel, PushKind
from herald.outbound.providers.clients import Answer, Http1, exchange, sync_client, tls_context
from herald.outbound.providers.document import seconds_left, shortened
from herald.outbound.providers.keyring import Keyring
from herald.outbound.providers.sender import Outcome, Result, by_status, failure, missing
from herald.outbound.providers.table import FIELD, Credentials, Entry, Option, Unusable
from herald.settings import Settings

KIND = "fcm"
MAX_TOKEN = 4096
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
LIMIT = 4096  # bytes of data + notification
MAX_TTL = 28 * 86_400
RENEW_BEFORE = 300.0  # seconds before expiry
GONE_CODE = "UNREGISTERED"
# The token belongs to another Firebase project than the service account's: a configuration
# mistake for the whole app, not a device that went away.
MISMATCH_CODE = "SENDER_ID_MISMATCH"


def check(info: Any) -> None:
    """Raise ValueError if `info` is not a usable service account (before it is stored)."""
    if (
        not isinstance(info, dict)
        or info.get("type") != "service_account"
        or not info.get("project_id")
    ):
        raise ValueError("not a service account JSON (type, project_id)")
    service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=[SCOPE]
    )


def render(message: Message, token: str) -> dict[str, Any]:
    """The `message` object of a send request (pure), shortened to fit if need be."""
    for doc in shortened(message):
        body = _message(message, token, doc)
        if len(msgspec.json.encode(body)) <= LIMIT:
            return body
    note = body.get("notification")
    while note is not None and len(msgspec.json.encode(body)) > LIMIT:
        # The alert's own text is too long: shorten its body, then its title.
        excess = len(msgspec.json.encode(body)) - LIMIT
        field = "body" if note.get("body") else "title"
        text = note[field].encode()
        note[field] = text[: max(0, len(text) - excess - 8)].decode(errors="ignore")
        if not note[field] and field == "title":
            break
    return body


def _message(message: Message, token: str, doc: dict[str, Any]) -> dict[str, Any]:
    data = {k: v if isinstance(v, str) else msgspec.json.encode(v).decode() for k, v in doc.items()}
    android: dict[str, Any] = {
        "priority": "HIGH" if message.priority is Priority.HIGH else "NORMAL",
        "ttl": f"{seconds_left(message.expires, MAX_TTL)}s",
        "collapse_key": message.notification_id,
    }
    out: dict[str, Any] = {"token": token, "data": data, "android": android}
    visual = message.payload.visual_content if message.payload is not None else None
    if message.kind in (PushKind.ALERT, PushKind.FALLBACK) and visual is not None:
        note = {"title": visual.title}
        if visual.body is not None:
            note["body"] = visual.body
        out["notification"] = note
        android["notification"] = {"tag": message.notification_id}
    return out


class Fcm:
    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        ca = settings.push_ca_file
        self.keyring = keyring
        self.http = Http1(tls_context(ca), settings.push_timeout)
        self.base = settings.push_fcm_url.rstrip("/")
        self.oauth = sync_client(ca, 30.0)
        self.tokens: dict[str, tuple[float, str, bytes]] = {}  # app -> (renew at, token, creds)
        self.refreshing: dict[str, asyncio.Future[str]] = {}

    async def send(self, app: str, channel: PushChannel, message: Message) -> Outcome:
        if not isinstance(channel, FcmChannel):
            return Outcome(Result.REJECTED, "not an FCM channel")
        raw = await self.keyring.get(app, KIND)
        if raw is None:
            return missing("FCM", app)
        try:
            info = msgspec.json.decode(raw)
            token = await self.token(app, info, raw)
        except google.auth.exceptions.TransportError as exc:
            return Outcome(Result.RETRY, f"FCM token endpoint: {type(exc).__name__}")
        except (google.auth.exceptions.GoogleAuthError, msgspec.DecodeError, ValueError) as exc:
            self.keyring.forget(app)
            return Outcome(Result.RETRY, f"FCM token refused: {_short(exc)}", credentials=True)
        url = f"{self.base}/v1/projects/{info['project_id']}/messages:send"
        body = {"message": render(message, channel.registration_token)}
        try:
            response = await exchange(
                self.http, "POST", url, content=msgspec.json.encode(body), headers=_headers(token)
            )
        except httpx.HTTPError as exc:
            return failure(exc)
        return self.outcome(app, response)

    def outcome(self, app: str, response: Answer) -> Outcome:
        status = response.status_code
        if status == 200:
            return by_status(status, response.headers, "")
        code, text = _error(response)
        if code == GONE_CODE:
            return Outcome(Result.GONE, text, status=status)
        if code == MISMATCH_CODE or status == 404:  # 404 without UNREGISTERED: a wrong URL
            return Outcome(Result.RETRY, text, credentials=True, status=status)
        if status in (401, 403):  # the token was refused: get a new one next time
            self.tokens.pop(app, None)
            self.keyring.forget(app)
        return by_status(status, response.headers, text)

    async def token(self, app: str, info: dict[str, Any], raw: bytes) -> str:
        cached = self.tokens.get(app)
        if cached is not None and cached[0] > time.time() and cached[2] == raw:
            return cached[1]
        # One refresh per app at a time, in a task of its own: an attempt that times out
        # stops waiting for it, but the refresh goes on and its token is kept for the next.
        running = self.refreshing.get(app)
        if running is None:
            running = asyncio.create_task(self._renew(app, info, raw))
            self.refreshing[app] = running
            running.add_done_callback(lambda task: self._renewed(app, task))
        return await asyncio.shield(running)

    async def _renew(self, app: str, info: dict[str, Any], raw: bytes) -> str:
        token, expiry = await asyncio.to_thread(self._refresh, info)
        self.tokens[app] = (expiry - RENEW_BEFORE, token, raw)
        return token

    def _renewed(self, app: str, task: asyncio.Task[str]) -> None:
        if self.refreshing.get(app) is task:
            del self.refreshing[app]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any) got it

    def _refresh(self, info: dict[str, Any]) -> tuple[str, float]:
        creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[SCOPE]
        )
        creds.refresh(_Transport(self.oauth))
        expiry = creds.expiry
        if expiry is None:
            return str(creds.token), time.time() + 3600
        # google-auth keeps naive UTC datetimes
        return str(creds.token), expiry.replace(tzinfo=expiry.tzinfo or UTC).timestamp()

    async def close(self) -> None:
        await self.http.aclose()
        self.oauth.close()


class _Response(google.auth.transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.response.headers)

    @property
    def data(self) -> bytes:
        return self.response.content


class _Transport(google.auth.transport.Request):
    """google-auth's transport interface over an httpx client."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Response:
        try:
            response = self.client.request(
                method, url, content=body, headers=headers, timeout=timeout or 30.0
            )
        except httpx.HTTPError as exc:
            raise google.auth.exceptions.TransportError(  # type: ignore[no-untyped-call]
                type(exc).__name__
            ) from exc
        return _Response(response)


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _error(response: Answer) -> tuple[str, str]:
    """(FCM error code, a short description) from Google's error body."""
    try:
        error = msgspec.json.decode(response.content)["error"]
        code = next(
            (d.get("errorCode", "") for d in error.get("details", []) if "errorCode" in d),
            error.get("status", ""),
        )
        return str(code), f"HTTP {response.status_code}: {code or error.get('message', '')}"
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        return "", f"HTTP {response.status_code}"


def _short(exc: Exception) -> str:
    # google-auth puts the token endpoint's answer in the message; never a credential.
    return str(exc).replace("\n", " ")[:200]


# -- registration --------------------------------------------------------------------------------


def parse(value: Any, settings: Settings) -> FcmChannel:
    body = fields.members(value, FIELD, {"registrationToken"})
    name = f"{FIELD}.registrationToken"
    token = fields.required(body.get("registrationToken"), name, MAX_TOKEN)
    if not token.isprintable() or " " in token:
        raise InvalidRequest(f"'{name}' is not a registration token.", target=name)
    return FcmChannel(token)


def load(values: Mapping[str, Any]) -> bytes:
    try:
        info = json.loads(Path(values["service_account"]).read_text())
        check(info)
    except (ValueError, TypeError) as exc:
        raise Unusable(str(exc), "--service-account") from exc
    return msgspec.json.encode(info)


def describe(stored: bytes) -> dict[str, Any]:
    info = msgspec.json.decode(stored)
    return {"projectId": info.get("project_id"), "clientEmail": info.get("client_email")}


SUMMARY = "FCM HTTP v1 with a service account."
OPTIONS = (Option("--service-account", "The Firebase service account JSON file.", file=True),)
CREDENTIALS = Credentials(KIND, SUMMARY, OPTIONS, load, describe)
ENTRY = Entry(channel=FcmChannel, parse=parse, credentials=CREDENTIALS, sender=Fcm)
