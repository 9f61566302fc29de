"""Device-side helpers for the live-stream tests: one `Stream` interface over a WebSocket and over
Server-Sent Events (parsed here, per the text/event-stream format), every wait bounded.

A background task reads the connection into a queue, so a test waiting with a timeout never
breaks the stream it waits on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

WAIT = 10.0  # the longest any single wait may take before the test fails
CHANGE_TYPES = {"created", "updated", "deleted", "expired"}
POSITIONED = CHANGE_TYPES | {"ready"}


# ---------------------------------------------------------------------------------------------
# Request bodies


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def in_seconds(seconds: float) -> str:
    return iso(datetime.now(UTC) + timedelta(seconds=seconds))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def p256dh() -> str:
    """A real uncompressed P-256 public key (65 bytes), base64url as browsers send it."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return b64url(key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))


def webpush_channel(endpoint: str | None = None) -> dict[str, Any]:
    return {
        "endpoint": endpoint or f"https://push.example.net/wpush/v2/{uuid.uuid4().hex}",
        "keys": {"p256dh": p256dh(), "auth": b64url(os.urandom(16))},
    }


def apns_channel() -> dict[str, Any]:
    return {"deviceToken": os.urandom(32).hex()}


def fcm_channel() -> dict[str, Any]:
    return {"registrationToken": f"fcm:{uuid.uuid4().hex}{uuid.uuid4().hex}"}


def wns_channel() -> dict[str, Any]:
    return {"channelUri": f"https://wns2-par02p.notify.windows.com/w/?token={uuid.uuid4().hex}"}


CHANNELS = {
    "webPush": webpush_channel,
    "iOS": apns_channel,
    "android": fcm_channel,
    "windows": wns_channel,
}


def subscription_body(host: str, platform: str = "live", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"application": host, "platform": platform}
    if platform in CHANNELS and "pushChannel" not in fields:
        body["pushChannel"] = CHANNELS[platform]()
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def notification_body(host: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetHostName": host,
        "appNotificationId": f"n-{uuid.uuid4().hex}",
        "payload": {"visualContent": {"title": "Hello", "body": "from the device tests"}},
    }
    body.update(fields)
    return body


def without_context(obj: dict[str, Any]) -> dict[str, Any]:
    """A notification as GET returns it, minus its `@odata.context` (the document's, not the
    resource's): a stream message or a delta item may carry it or not."""
    return {k: v for k, v in obj.items() if k != "@odata.context"}


def assert_graph_error(
    r: httpx.Response, status: int, code: str, target: str | None = None, prefix: bool = False
) -> dict[str, Any]:
    """The response is a Graph error of this status and code (and target, or a dotted path under
    it when `prefix`), with the request id of the response in `innerError`."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["innerError"]["request-id"] == r.headers["request-id"], error
    if target is not None:
        if prefix:
            assert error.get("target", "").split(".")[0] == target, error
        else:
            assert error.get("target") == target, error
    return dict(error)


# ---------------------------------------------------------------------------------------------
# Streams


class Refused(Exception):
    """The stream was not opened: the HTTP answer (SSE) or the refused handshake (WebSocket)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"{status} {body[:300]!r}")
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class End:
    """The stream ended: the WebSocket close code and reason (None for SSE) or the error."""

    code: int | None = None
    reason: str = ""
    error: str = ""


@dataclass
class Frame:
    """One SSE event block: its fields in order and its comment lines."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k == name]
        return "\n".join(values) if values else None


class Stream:
    protocol = ""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.keepalives = 0
        self.messages: list[dict[str, Any]] = []  # every message taken so far, keep-alives aside
        self.end: End | None = None
        self._task: asyncio.Task[None] | None = None

    async def _item(self, wait: float) -> tuple[str, Any]:
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            raise AssertionError(
                f"{self.protocol}: nothing arrived within {wait:.1f} s "
                f"(messages so far: {self.messages})"
            ) from None

    async def next(self, wait: float = WAIT, keepalive: bool = False) -> dict[str, Any]:
        """The next message; keep-alives are skipped unless `keepalive`; an end fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            kind, value = await self._item(max(0.0, deadline - loop.time()))
            if kind == "end":
                self.end = value
                await self.queue.put((kind, value))  # stays ended
                raise AssertionError(f"{self.protocol}: stream ended ({value}) awaiting a message")
            if kind == "keepalive":
                self.keepalives += 1
                if keepalive:
                    return {"type": "keepalive"}
                continue
            self.messages.append(value)
            return dict(value)

    async def ready(self) -> int:
        message = await self.next()
        assert message["type"] == "ready", message
        assert set(message) == {"type", "position"}, message
        assert isinstance(message["position"], int) and message["position"] >= 0
        return int(message["position"])

    async def until_end(self, wait: float = WAIT) -> tuple[list[dict[str, Any]], End]:
        """Every message up to the end of the stream (keep-alives aside), and how it ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        messages = []
        while True:
            kind, value = await self._item(max(0.0, deadline - loop.time()))
            if kind == "end":
                self.end = value
                await self.queue.put((kind, value))
                return messages, value
            if kind == "message":
                self.messages.append(value)
                messages.append(value)

    async def _run(self) -> None:
        raise NotImplementedError

    async def _reader(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the end of the stream, however it happened
            await self.queue.put(("end", End(error=repr(exc))))


class WsStream(Stream):
    protocol = "ws"

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__()
        self.ws = ws

    async def _run(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if message == {"type": "keepalive"}:
                    await self.queue.put(("keepalive", None))
                else:
                    await self.queue.put(("message", message))
        except websockets.ConnectionClosed:
            pass
        await self.queue.put(
            ("end", End(code=self.ws.close_code, reason=self.ws.close_reason or ""))
        )


class SseStream(Stream):
    protocol = "sse"

    def __init__(self, response: httpx.Response) -> None:
        super().__init__()
        self.response = response
        self.lines: list[str] = []  # the raw body, line by line
        self.frames: list[Frame] = []  # every event block, in order
        self.retry: str | None = None

    async def _run(self) -> None:
        frame = Frame()
        async for line in self.response.aiter_lines():
            self.lines.append(line)
            if line == "":
                if frame.fields or frame.comments:
                    self.frames.append(frame)
                    await self._dispatch(frame)
                frame = Frame()
            elif line.startswith(":"):
                frame.comments.append(line[1:].removeprefix(" "))
            else:
                name, _, value = line.partition(":")
                frame.fields.append((name, value.removeprefix(" ")))
        await self.queue.put(("end", End()))

    async def _dispatch(self, frame: Frame) -> None:
        if frame.get("retry") is not None:
            self.retry = frame.get("retry")
        data = frame.get("data")
        if data is None:
            if frame.comments == ["keepalive"]:
                await self.queue.put(("keepalive", None))
            return
        message = json.loads(data)
        # SSE framing: `event:` is the type; `id:` the position for ready and change messages.
        problems = []
        if frame.get("event") != message.get("type"):
            problems.append(f"event {frame.get('event')!r} != type {message.get('type')!r}")
        positioned = message.get("type") in POSITIONED
        if positioned and frame.get("id") != str(message.get("position")):
            problems.append(f"id {frame.get('id')!r} != position {message.get('position')}")
        if problems:
            message = {**message, "_framing": problems}
        await self.queue.put(("message", message))

    async def next(self, wait: float = WAIT, keepalive: bool = False) -> dict[str, Any]:
        message = await super().next(wait, keepalive)
        assert "_framing" not in message, message
        return message


def ws_url(base_url: str) -> str:
    return "ws" + base_url.removeprefix("http")


@contextlib.asynccontextmanager
async def open_stream(
    protocol: str,
    base_url: str,
    subscription: str,
    token: str | None,
    *,
    after: int | str | None = None,
    last_event_id: int | str | None = None,
    query_token: bool = False,
    version: str = "beta",
) -> AsyncIterator[Stream]:
    """Open `GET /{version}/me/notificationSubscriptions/{id}/stream` as a WebSocket ("ws") or
    as Server-Sent Events ("sse"); raise `Refused` if the server does not open it."""
    path = f"/{version}/me/notificationSubscriptions/{subscription}/stream"
    params: dict[str, str] = {}
    headers: dict[str, str] = {}
    if after is not None:
        params["after"] = str(after)
    if token is not None:
        if query_token:
            params["access_token"] = token
        else:
            headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    stream: Stream
    if protocol == "ws":
        url = str(httpx.URL(ws_url(base_url) + path, params=params))
        try:
            ws = await connect(
                url, additional_headers=headers, open_timeout=WAIT, close_timeout=2, proxy=None
            )
        except websockets.InvalidStatus as exc:
            response = exc.response
            raise Refused(
                response.status_code,
                {k.lower(): v for k, v in response.headers.raw_items()},
                bytes(response.body or b""),
            ) from None
        stream = WsStream(ws)
        stream._task = asyncio.create_task(stream._reader())
        try:
            yield stream
        finally:
            stream._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream._task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
        return
    assert protocol == "sse", protocol
    timeout = httpx.Timeout(WAIT, read=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False) as client:
        request = client.build_request("GET", path, params=params, headers=headers)
        response = await asyncio.wait_for(client.send(request, stream=True), WAIT)
        try:
            if response.status_code != 200:
                body = await asyncio.wait_for(response.aread(), WAIT)
                raise Refused(response.status_code, dict(response.headers), body)
            stream = SseStream(response)
            stream._task = asyncio.create_task(stream._reader())
            try:
                yield stream
            finally:
                stream._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stream._task
        finally:
            await response.aclose()


def api(base_url: str, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=WAIT, trust_env=False)
