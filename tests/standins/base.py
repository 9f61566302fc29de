"""What every stand-in shares: the ASGI plumbing, the journal of what was accepted and refused,
the fault script, the HTTP control API and the lifecycle (start in a thread / stop)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs

from tests.standins.server import ServerThread
from tests.standins.tls import TlsFiles

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 1 << 20  # what a stand-in reads at most; every service's own limit is far lower
SEND = "send"  # `on` of the push endpoint
TOKEN = "token"  # `on` of an OAuth token endpoint (FCM, WNS)


# -- requests and responses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str  # the raw query string
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order, repeats kept
    body: bytes
    http_version: str  # "1.1" or "2"

    def header(self, name: str) -> str | None:
        """The first value of a header (None if absent)."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_count(self, name: str) -> int:
        return sum(1 for k, _ in self.headers if k == name)

    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def header_map(self, *, omit: Iterable[str] = ()) -> dict[str, str]:
        """The headers as a dict (repeats joined with ", "), without `omit` and credentials."""
        skip = {"authorization", *omit}
        out: dict[str, str] = {}
        for k, v in self.headers:
            if k not in skip:
                out[k] = f"{out[k]}, {v}" if k in out else v
        return out


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
        body = json.dumps(data, separators=(",", ":")).encode()
        return cls(status, body, [("content-type", "application/json; charset=utf-8"), *headers])


class Refused(Exception):
    """Raised by a provider's handler: answer `response`; the journal records `reason`."""

    def __init__(self, response: Response, reason: str, detail: str = "") -> None:
        super().__init__(f"{response.status} {reason}: {detail}")
        self.response = response
        self.reason = reason
        self.detail = detail


# -- the journal --------------------------------------------------------------------------------


@dataclass
class Delivery:
    """A request the stand-in accepted, verified and decoded.

    `payload` is what the service decoded (Web Push: the decrypted body; APNs: the JSON payload;
    FCM: the `message` object; WNS: the parsed notification). `message` is Herald's message in it
    (docs/push.md) when there is one: Web Push the body, APNs `herald`, FCM `data` (every value a
    string, as sent), WNS raw the body and WNS toast the `launch` attribute, parsed as JSON.
    """

    provider: str
    target: str  # subscription id / device token / registration token / channel token
    # webpush: "push"; apns: the push type; fcm: "notification" or "data";
    # wns: the X-WNS-Type, or "delete" (a DELETE with X-WNS-Match)
    kind: str
    id: str  # the id the service answered with (Location, apns-id, name, X-WNS-Msg-ID)
    payload: Any
    message: Any
    headers: dict[str, str]  # the request headers, lower-case names, without Authorization
    details: dict[str, Any]  # provider-specific decoded fields (ttl, priority, title, ...)
    method: str = "POST"
    http_version: str = "2"
    at: float = field(default_factory=time.time)
    seq: int = 0  # 1, 2, ... in order of acceptance (set by the journal)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "target": self.target,
            "kind": self.kind,
            "id": self.id,
            "payload": _jsonable(self.payload),
            "message": _jsonable(self.message),
            "headers": self.headers,
            "details": _jsonable(self.details),
            "method": self.method,
            "http_version": self.http_version,
            "at": self.at,
            "seq": self.seq,
        }


@dataclass
class Refusal:
    provider: str
    target: str | None
    status: int  # 0: the client went away while the response was delayed (not processed)
    reason: str  # the service's own word where it has one (APNs reason, FCM errorCode, ...)
    detail: str
    on: str = SEND  # SEND or TOKEN
    fault: bool = False  # answered by the fault script, not by verification
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "target": self.target,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
            "on": self.on,
            "fault": self.fault,
            "at": self.at,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class Journal:
    """Thread-safe record of accepted and refused requests, and counters.

    `keep` bounds how many records are retained (None: all); the counts are always exact.
    """

    def __init__(self, provider: str, keep: int | None = None) -> None:
        self.provider = provider
        self._cond = threading.Condition()
        self._accepted: deque[Delivery] = deque(maxlen=keep)
        self._refused: deque[Refusal] = deque(maxlen=keep)
        self._by_target: Counter[str] = Counter()
        self._by_kind: Counter[str] = Counter()
        self._by_both: Counter[tuple[str, str]] = Counter()
        self._accepted_total = 0
        self._refused_total = 0
        self._counters: Counter[str] = Counter()

    def accept(self, delivery: Delivery) -> Delivery:
        with self._cond:
            self._accepted_total += 1
            delivery.seq = self._accepted_total
            self._accepted.append(delivery)
            self._by_target[delivery.target] += 1
            self._by_kind[delivery.kind] += 1
            self._by_both[(delivery.target, delivery.kind)] += 1
            self._cond.notify_all()
        return delivery

    def refuse(self, refusal: Refusal) -> None:
        with self._cond:
            self._refused_total += 1
            self._refused.append(refusal)
            self._cond.notify_all()

    def count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._counters[name] += n

    def counter(self, name: str) -> int:
        with self._cond:
            return self._counters[name]

    def accepted_count(self, target: str | None = None, kind: str | None = None) -> int:
        with self._cond:
            return self._count(target, kind)

    def _count(self, target: str | None, kind: str | None) -> int:
        if target is not None and kind is not None:
            return self._by_both[(target, kind)]
        if target is not None:
            return self._by_target[target]
        if kind is not None:
            return self._by_kind[kind]
        return self._accepted_total

    def accepted(
        self, target: str | None = None, kind: str | None = None, since: int = 0
    ) -> list[Delivery]:
        with self._cond:
            return [
                d
                for d in self._accepted
                if d.seq > since
                and (target is None or d.target == target)
                and (kind is None or d.kind == kind)
            ]

    def refused(self, target: str | None = None, on: str | None = None) -> list[Refusal]:
        with self._cond:
            return [
                r
                for r in self._refused
                if (target is None or r.target == target) and (on is None or r.on == on)
            ]

    def wait(
        self, count: int, timeout: float, target: str | None = None, kind: str | None = None
    ) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count(target, kind) >= count, timeout)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "accepted": self._accepted_total,
                "refused": self._refused_total,
                **self._counters,
            }

    def reset(self) -> None:
        with self._cond:
            self._accepted.clear()
            self._refused.clear()
            self._by_target.clear()
            self._by_kind.clear()
            self._by_both.clear()
            self._accepted_total = 0
            self._refused_total = 0
            self._counters.clear()
            self._cond.notify_all()

    def timeout_message(
        self, count: int, timeout: float, target: str | None, kind: str | None
    ) -> str:
        with self._cond:
            got = self._count(target, kind)
            last = [r.to_json() for r in list(self._refused)[-5:]]
        which = "".join(
            f" {k}={v!r}" for k, v in (("target", target), ("kind", kind)) if v is not None
        )
        return (
            f"{self.provider}: {got} of {count} messages accepted{which} after {timeout}s; "
            f"last refusals: {json.dumps(last)}"
        )


# -- the fault script ---------------------------------------------------------------------------


@dataclass
class Fault:
    status: int
    remaining: int | None  # None: until cleared
    headers: dict[str, str]
    reason: str | None  # provider word (APNs reason, FCM errorCode, WNS description, ...)
    target: str | None  # None: any request
    on: str


@dataclass
class Delay:
    seconds: float
    remaining: int | None
    target: str | None
    on: str


class FaultScript:
    """Scripted misbehaviour, consumed by requests in order. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._delays: list[Delay] = []
        self._gone: dict[str, int | None] = {}

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def add_delay(self, delay: Delay) -> None:
        with self._lock:
            self._delays = [d for d in self._delays if (d.target, d.on) != (delay.target, delay.on)]
            if delay.seconds > 0:
                self._delays.append(delay)

    def mark_gone(self, target: str, status: int | None) -> None:
        with self._lock:
            self._gone[target] = status

    def revive(self, target: str) -> None:
        with self._lock:
            self._gone.pop(target, None)

    def is_gone(self, target: str | None) -> tuple[bool, int | None]:
        if target is None:
            return False, None
        with self._lock:
            if target in self._gone:
                return True, self._gone[target]
        return False, None

    def take_fault(self, on: str, target: str | None) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.on == on and (f.target is None or f.target == target):
                    if f.remaining is not None:
                        f.remaining -= 1
                        if f.remaining <= 0:
                            self._faults.remove(f)
                    return f
        return None

    def take_delay(self, on: str, target: str | None) -> float:
        with self._lock:
            for d in self._delays:
                if d.on == on and (d.target is None or d.target == target):
                    if d.remaining is not None:
                        d.remaining -= 1
                        if d.remaining <= 0:
                            self._delays.remove(d)
                    return d.seconds
        return 0.0

    def clear(self, *, gone: bool = True) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()
            if gone:
                self._gone.clear()


# -- the stand-in -------------------------------------------------------------------------------


class StandIn:
    """An HTTPS push service stand-in: an ASGI app plus its journal, fault script and control API.

    Use it as a context manager (or start()/stop()) to run it in a background thread; or run it
    in its own process with `python -m tests.standins PROVIDER --port N --dir D`.
    """

    provider: ClassVar[str] = "standin"

    def __init__(
        self,
        tls: TlsFiles,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int | None = None,
    ) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        self.journal = Journal(self.provider, keep)
        self.script = FaultScript()
        self._url: str | None = None
        self._thread: ServerThread | None = None

    # -- lifecycle

    @property
    def url(self) -> str:
        """The base URL, e.g. https://127.0.0.1:43210 (once started)."""
        if self._url is None:
            raise RuntimeError(f"the {self.provider} stand-in is not started")
        return self._url

    @property
    def origin(self) -> str:
        return self.url

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    def bound(self, url: str) -> None:
        """Called once the server listens at `url` (thread or process mode)."""
        self._url = url

    def start(self) -> str:
        self._thread = ServerThread(
            self, self.tls, host=self.host, port=self.port, name=f"standin-{self.provider}"
        )
        self.bound(self._thread.start())
        return self.url

    def stop(self) -> None:
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def info(self) -> dict[str, Any]:
        """What another process needs: URLs, the CA, the credentials to configure Herald with."""
        return {
            "provider": self.provider,
            "url": self.url,
            "ca_file": str(self.ca_file),
            "control": f"{self.url}/_control",
        }

    def write_credentials(self, directory: Path) -> dict[str, Any]:
        """Process mode: write credential files into `directory`; their paths for `info()`."""
        return {}

    # -- the record

    def target_of(self, value: str) -> str:
        """The journal's key for a target given as a URL, token, ... (provider-specific)."""
        return value

    def accepted(
        self, target: str | None = None, *, kind: str | None = None, since: int = 0
    ) -> list[Delivery]:
        """The accepted (verified, decoded) requests, oldest first."""
        key = None if target is None else self.target_of(target)
        return self.journal.accepted(key, kind, since)

    def messages(self, target: str | None = None, *, kind: str | None = None) -> list[Any]:
        """Just Herald's messages of the accepted requests (see Delivery.message)."""
        return [d.message for d in self.accepted(target, kind=kind)]

    def refused(self, target: str | None = None, *, on: str | None = None) -> list[Refusal]:
        key = None if target is None else self.target_of(target)
        return self.journal.refused(key, on)

    def stats(self) -> dict[str, int]:
        """Counts: accepted, refused, requests, token_requests, ... (provider-specific extras)."""
        return self.journal.stats()

    def wait_accepted(
        self,
        count: int,
        timeout: float = 10.0,
        *,
        target: str | None = None,
        kind: str | None = None,
    ) -> list[Delivery]:
        """Block until `count` requests (for `target`/of `kind`) were accepted since the last
        reset; their retained records. TimeoutError (with the last refusals) otherwise."""
        key = None if target is None else self.target_of(target)
        if not self.journal.wait(count, timeout, key, kind):
            raise TimeoutError(self.journal.timeout_message(count, timeout, key, kind))
        return self.journal.accepted(key, kind)

    async def wait_accepted_async(
        self,
        count: int,
        timeout: float = 10.0,  # noqa: ASYNC109 (the same call as wait_accepted)
        *,
        target: str | None = None,
        kind: str | None = None,
    ) -> list[Delivery]:
        """wait_accepted() for async tests (polls; never blocks the caller's loop)."""
        key = None if target is None else self.target_of(target)
        deadline = time.monotonic() + timeout
        while self.journal.accepted_count(key, kind) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(self.journal.timeout_message(count, timeout, key, kind))
            await asyncio.sleep(0.01)
        return self.journal.accepted(key, kind)

    # -- the fault script

    def fault(
        self,
        status: int,
        count: int | None = 1,
        *,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
        target: str | None = None,
        on: str = SEND,
    ) -> None:
        """The next `count` requests (None: all, until clear_faults()) — only those for `target`
        if given; `on="token"` for the OAuth token endpoint — are answered `status` with the
        service's own error body for it (`reason` picks the APNs reason / FCM errorCode / WNS
        description) and `headers` (e.g. {"Retry-After": "2"}). Nothing else is checked."""
        key = None if target is None else self.target_of(target)
        self.script.add_fault(Fault(status, count, dict(headers or {}), reason, key, on))

    def delay(
        self,
        seconds: float,
        *,
        target: str | None = None,
        on: str = SEND,
        count: int | None = None,
    ) -> None:
        """Delay each response (only for `target` if given; the next `count` or all) by
        `seconds`; 0 removes the delay. A client that gives up meanwhile (a timeout) leaves its
        request unprocessed: it is recorded as refused with status 0, never accepted."""
        key = None if target is None else self.target_of(target)
        self.script.add_delay(Delay(seconds, count, key, on))

    def gone(self, target: str, status: int | None = None) -> None:
        """From now on answer `target` as the service does for a channel that no longer
        exists (Web Push 410, APNs 410 Unregistered, FCM 404 UNREGISTERED, WNS 410)."""
        self.script.mark_gone(self.target_of(target), status)

    def revive(self, target: str) -> None:
        self.script.revive(self.target_of(target))

    def clear_faults(self) -> None:
        """Drop scripted faults and delays (gone targets stay gone)."""
        self.script.clear(gone=False)

    def reset(self) -> None:
        """Forget the record and the whole fault script (targets and credentials stay)."""
        self.script.clear()
        self.journal.reset()

    # -- provider hooks

    def route(self, req: Request) -> tuple[str, str | None]:
        """(on, target) of a request, cheaply, for the fault script (target None: unknown)."""
        return SEND, None

    async def handle(self, req: Request, on: str, target: str | None) -> Response:
        raise NotImplementedError

    def fault_response(self, fault: Fault, on: str, target: str | None) -> Response:
        headers = list(fault.headers.items())
        return Response(fault.status, (fault.reason or "").encode(), headers)

    def create(self, **options: Any) -> Any:
        """A new target (subscription, token, channel) for the control API's /new."""
        raise NotImplementedError

    def check_gone(self, target: str) -> None:
        gone, status = self.script.is_gone(target)
        if gone:
            raise self.gone_refusal(target, status)

    def gone_refusal(self, target: str, status: int | None) -> Refused:
        return Refused(Response(status or 410), "Gone", "the channel is gone")

    # -- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body, complete = await _read_body(receive)
        if body is None:  # the client went away mid-request
            return
        req = Request(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=tuple(
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]
            ),
            body=body,
            http_version=scope.get("http_version", "1.1"),
        )
        if req.path.startswith("/_control/"):
            response: Response | None = await self._control(req)
        elif not complete:
            response = Response(413, b"request body too large for a stand-in")
            self.journal.refuse(Refusal(self.provider, None, 413, "TooLarge", "over 1 MiB"))
        else:
            response = await self._serve(req, receive)
        if response is not None:
            await _respond(send, response)

    async def _serve(self, req: Request, receive: Receive) -> Response | None:
        on, target = self.route(req)
        self.journal.count("token_requests" if on == TOKEN else "requests")
        delay = self.script.take_delay(on, target)
        if delay > 0 and await _client_left(receive, delay):
            detail = f"the client went away during a {delay}s delay; not processed"
            self.journal.refuse(Refusal(self.provider, target, 0, "ClientGone", detail, on))
            return None
        fault = self.script.take_fault(on, target)
        if fault is not None:
            response = self.fault_response(fault, on, target)
            reason = fault.reason or f"HTTP {fault.status}"
            self.journal.refuse(
                Refusal(self.provider, target, response.status, reason, "scripted", on, True)
            )
            return response
        try:
            return await self.handle(req, on, target)
        except Refused as r:
            self.journal.refuse(
                Refusal(self.provider, target, r.response.status, r.reason, r.detail, on)
            )
            return r.response

    # -- the control API

    async def _control(self, req: Request) -> Response:
        name = req.path.removeprefix("/_control/")
        try:
            body: dict[str, Any] = json.loads(req.body) if req.body else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            return await self._control_call(req.method, name, req.params(), body)
        except (ValueError, KeyError, TypeError) as e:
            return Response.json(400, {"error": f"{type(e).__name__}: {e}"})

    async def _control_call(
        self, method: str, name: str, params: dict[str, list[str]], body: dict[str, Any]
    ) -> Response:
        def param(key: str) -> str | None:
            return params[key][0] if key in params else None

        if method == "GET" and name == "stats":
            return Response.json(200, self.stats())
        if method == "GET" and name == "info":
            return Response.json(200, self.info())
        if method == "GET" and name == "accepted":
            since = int(param("since") or 0)
            found = self.accepted(param("target"), kind=param("kind"), since=since)
            return Response.json(200, [d.to_json() for d in found])
        if method == "GET" and name == "refused":
            found_r = self.refused(param("target"), on=param("on"))
            return Response.json(200, [r.to_json() for r in found_r])
        if method != "POST":
            return Response.json(404, {"error": f"no control {method} {name}"})
        if name == "wait":
            count = int(body["count"])
            timeout = float(body.get("timeout", 10.0))
            try:
                await self.wait_accepted_async(
                    count, timeout, target=body.get("target"), kind=body.get("kind")
                )
            except TimeoutError as e:
                return Response.json(504, {"error": str(e), "stats": self.stats()})
            return Response.json(200, self.stats())
        if name == "fault":
            times = body.get("count", 1)
            self.fault(
                int(body["status"]),
                None if times is None else int(times),
                headers={str(k): str(v) for k, v in (body.get("headers") or {}).items()},
                reason=body.get("reason"),
                target=body.get("target"),
                on=str(body.get("on", SEND)),
            )
        elif name == "delay":
            times = body.get("count")
            self.delay(
                float(body["seconds"]),
                target=body.get("target"),
                on=str(body.get("on", SEND)),
                count=None if times is None else int(times),
            )
        elif name == "gone":
            status = body.get("status")
            self.gone(str(body["target"]), None if status is None else int(status))
        elif name == "revive":
            self.revive(str(body["target"]))
        elif name == "clear-faults":
            self.clear_faults()
        elif name == "reset":
            self.reset()
        elif name == "new":
            options = {k: v for k, v in body.items() if k != "count"}
            items = [self.create(**options) for _ in range(int(body.get("count", 1)))]
            return Response.json(200, {"items": items})
        else:
            extra = self.control_extra(name, body)
            if extra is None:
                return Response.json(404, {"error": f"no control {method} {name}"})
            return extra
        return Response.json(200, {"ok": True})

    def control_extra(self, name: str, body: dict[str, Any]) -> Response | None:
        """Provider-specific POST /_control/NAME (None: no such call)."""
        return None


async def _read_body(receive: Receive) -> tuple[bytes | None, bool]:
    """The request body and whether it was read whole (False: over MAX_BODY); None if the client
    disconnected first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= MAX_BODY:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), size <= MAX_BODY


async def _client_left(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds`; True as soon as the client disconnects meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return True
    return False


async def _respond(send: Send, response: Response) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
