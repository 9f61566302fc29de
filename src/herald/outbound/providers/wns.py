"""WNS: an OAuth client-credentials access token, then one request to the device's channel URI.

Visual alerts are toasts (XML built with ElementTree, so every text is escaped); raw content and
content syncs are raw notifications. A notification that was read, dismissed, activated or
deleted elsewhere has its toast deleted from Action Center (`DELETE` with `X-WNS-Match`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import httpx
import msgspec

from herald import fields
from herald.errors import InvalidRequest
from herald.model import Message, Priority, PushChannel, PushKind, UserActionState, WnsChannel
from herald.outbound.providers.clients import Http1, exchange, tls_context
from herald.outbound.providers.document import collapse_key, fitted, seconds_left, shortened
from herald.outbound.providers.keyring import Keyring
from herald.outbound.providers.sender import Outcome, Result, by_status, failure, missing
from herald.outbound.providers.table import FIELD, Credentials, Entry, Option
from herald.settings import Settings

KIND = "wns"
LIMIT = 5000  # bytes of body
MAX_TTL = 28 * 86_400
RENEW_BEFORE = 300.0
PRIORITY = {Priority.HIGH: "1", Priority.NONE: "2", Priority.LOW: "3"}


class WnsCredentials(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str  # the package SID, ms-app://…
    client_secret: str


def allowed(uri: str, hosts: str) -> bool:
    """Whether a channel URI names one of `hosts` ("a.b, *.c"): tokens only go there."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
    except ValueError:
        return False
    patterns = [h.strip().lower() for h in hosts.split(",") if h.strip()]
    return parts.scheme == "https" and any(fnmatch.fnmatchcase(host, p) for p in patterns)


def settled(message: Message) -> bool:
    """Whether the toast should leave Action Center: deleted, or dealt with on another device."""
    return message.kind is PushKind.REMOVE or (
        message.kind is PushKind.SYNC
        and (
            message.read_state.value == "read"
            or message.user_action_state in (UserActionState.DISMISSED, UserActionState.ACTIVATED)
        )
    )


def render(message: Message) -> tuple[str, dict[str, str], bytes]:
    """(method, headers, body) for one message (pure)."""
    tag = collapse_key(message.notification_id, 16)
    if settled(message):
        return "DELETE", {"X-WNS-Match": f"type:wns/toast;tag={tag}"}, b""
    headers = {
        "X-WNS-TTL": str(seconds_left(message.expires, MAX_TTL)),
        "X-WNS-Priority": PRIORITY[message.priority],
    }
    visual = message.payload.visual_content if message.payload is not None else None
    if message.kind in (PushKind.ALERT, PushKind.FALLBACK) and visual is not None:
        headers |= {"X-WNS-Type": "wns/toast", "Content-Type": "text/xml", "X-WNS-Tag": tag}
        return "POST", headers, toast(message)
    headers |= {"X-WNS-Type": "wns/raw", "Content-Type": "application/octet-stream"}
    return "POST", headers, fitted(message, LIMIT)


def toast(message: Message) -> bytes:
    """The toast XML; its texts are shortened if escaping makes it longer than WNS takes."""
    assert message.payload is not None and message.payload.visual_content is not None
    visual = message.payload.visual_content
    title, body = visual.title, visual.body or ""
    for launch in shortened(message):  # the message in `launch`, shortened if need be
        xml = _toast(launch, title, body)
        if len(xml) <= LIMIT:
            return xml
    if len(_toast(launch, title, "")) > LIMIT:
        body, title = "", title[: _longest(lambda n: _toast(launch, title[:n], ""), len(title))]
    else:
        body = body[: _longest(lambda n: _toast(launch, title, body[:n]), len(body))]
    return _toast(launch, title, body)


def _longest(render: Callable[[int], bytes], size: int) -> int:
    """The largest n <= size whose rendering fits in LIMIT (render(0) must fit)."""
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(mid)) <= LIMIT:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _toast(launch: dict[str, Any], title: str, body: str) -> bytes:
    root = ElementTree.Element("toast", launch=_xml_text(msgspec.json.encode(launch).decode()))
    binding = ElementTree.SubElement(
        ElementTree.SubElement(root, "visual"), "binding", template="ToastGeneric"
    )
    ElementTree.SubElement(binding, "text").text = _xml_text(title)
    if body:
        ElementTree.SubElement(binding, "text").text = _xml_text(body)
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=False))


def _xml_text(text: str) -> str:
    """Without the characters XML 1.0 cannot carry at all (escaping does not help them)."""
    return "".join(c for c in text if (c >= " " or c in "\t\n\r") and c not in "\ufffe\uffff")


class Wns:
    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        self.keyring = keyring
        self.http = Http1(tls_context(settings.push_ca_file), settings.push_timeout)
        self.token_url = settings.push_wns_token_url
        self.hosts = settings.push_wns_hosts
        self.tokens: dict[str, tuple[float, str, bytes]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def send(self, app: str, channel: PushChannel, message: Message) -> Outcome:
        if not isinstance(channel, WnsChannel):
            return Outcome(Result.REJECTED, "not a WNS channel")
        if not allowed(channel.channel_uri, self.hosts):
            return Outcome(Result.REJECTED, "channel URI host is not a WNS host")
        raw = await self.keyring.get(app, KIND)
        if raw is None:
            return missing("WNS", app)
        try:
            token = await self.token(app, raw)
        except _Refused as exc:
            self.keyring.forget(app)
            return Outcome(Result.RETRY, str(exc), exc.retry_after, credentials=exc.credentials)
        except httpx.HTTPError as exc:
            return failure(exc)
        method, headers, body = render(message)
        headers["Authorization"] = f"Bearer {token}"
        try:
            response = await exchange(
                self.http, method, channel.channel_uri, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            return failure(exc)
        status = response.status_code
        text = f"HTTP {status}"
        described = response.headers.get("x-wns-error-description")
        if described:
            text += f": {described[:200]}"
        if status in (401, 403):
            self.tokens.pop(app, None)
            self.keyring.forget(app)
        if status == 406:  # WNS's throttle
            return Outcome(Result.RETRY, text, 60.0, status=status)
        return by_status(status, response.headers, text)

    async def token(self, app: str, raw: bytes) -> str:
        cached = self.tokens.get(app)
        if cached is not None and cached[0] > time.time() and cached[2] == raw:
            return cached[1]
        async with self.locks.setdefault(app, asyncio.Lock()):
            cached = self.tokens.get(app)
            if cached is not None and cached[0] > time.time() and cached[2] == raw:
                return cached[1]
            try:
                creds = msgspec.json.decode(raw, type=WnsCredentials)
            except msgspec.DecodeError as exc:
                raise _Refused("unusable WNS credentials", credentials=True) from exc
            response = await exchange(
                self.http,
                "POST",
                self.token_url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": creds.client_id,
                    "client_secret": creds.client_secret,
                    "scope": "notify.windows.com",
                },
            )
            body: Any = None
            with contextlib.suppress(ValueError):
                body = response.json()
            if (
                response.status_code != 200
                or not isinstance(body, dict)
                or not isinstance(body.get("access_token"), str)
            ):
                status = response.status_code
                error = body.get("error", "") if isinstance(body, dict) else ""
                transient = status == 429 or status >= 500
                raise _Refused(
                    f"WNS token endpoint: HTTP {status} {error}".strip(),
                    credentials=not transient,
                )
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 3600))
            self.tokens[app] = (time.time() + lifetime - RENEW_BEFORE, token, raw)
            return token

    async def close(self) -> None:
        await self.http.aclose()


class _Refused(Exception):
    def __init__(self, message: str, credentials: bool, retry_after: float | None = None):
        super().__init__(message)
        self.credentials = credentials
        self.retry_after = retry_after


# -- registration --------------------------------------------------------------------------------


def parse(value: Any, settings: Settings) -> WnsChannel:
    """A channel URI, which must name a WNS host: Herald sends its access token there."""
    body = fields.members(value, FIELD, {"channelUri"})
    uri = fields.https_url(body.get("channelUri"), f"{FIELD}.channelUri")
    if not allowed(uri, settings.push_wns_hosts):
        raise InvalidRequest(
            f"'{FIELD}.channelUri' must be a WNS channel URI (a host matching "
            f"{settings.push_wns_hosts}).",
            target=f"{FIELD}.channelUri",
        )
    return WnsChannel(uri)


def load(values: Mapping[str, Any]) -> bytes:
    creds = WnsCredentials(client_id=values["client_id"], client_secret=values["client_secret"])
    return msgspec.json.encode(creds)


def describe(stored: bytes) -> dict[str, Any]:
    return {"clientId": msgspec.json.decode(stored, type=WnsCredentials).client_id}


SUMMARY = "WNS client credentials."
OPTIONS = (
    Option("--client-id", "The package SID (ms-app://…)."),
    Option("--client-secret", "The client secret.", secret=True),
)
CREDENTIALS = Credentials(KIND, SUMMARY, OPTIONS, load, describe)
ENTRY = Entry(channel=WnsChannel, parse=parse, credentials=CREDENTIALS, sender=Wns)
