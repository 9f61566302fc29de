"""`herald listen`: act as a device of USER of an app and print its live stream.

It registers a `live` subscription (or reuses the one it registered before), opens the WebSocket
stream (docs/devices.md) and prints every change. The subscription id and the last position are
kept in a small JSON file, so a restart resumes with `after=<position>` and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import click
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from herald.auth.issuer import LocalIssuer
from herald.cli.apps import find_app
from herald.cli.command import common_options, load_settings, run
from herald.settings import Settings

CHANGES = frozenset({"created", "updated", "deleted", "expired"})
# Close codes of docs/devices.md.
TOKEN_EXPIRED, SUBSCRIPTION_GONE, RESYNC_REQUIRED = 4401, 4404, 4410
FIRST_DELAY, MAX_DELAY = 1.0, 30.0
# A connection that lived at least this long was healthy: a planned close (token expiry,
# subscription gone) is followed by an immediate reconnect. A shorter one waits like a failure,
# so a misbehaving server is not hammered.
HEALTHY_SECONDS = 5.0
RENEW_WITHIN = timedelta(days=1)
# What follows a connection attempt: reconnect at once, or after the next backoff delay.
Next = Literal["now", "backoff"]


class Fatal(click.ClickException):
    """A problem retrying cannot fix (bad token, no permission, unknown app)."""


class Done(Exception):
    """--count changes have been printed."""


def say(message: str) -> None:
    click.echo(f"herald listen: {message}", err=True)


# --- state -----------------------------------------------------------------------------------


@dataclass
class State:
    """What survives a restart: the subscription and the last position processed."""

    path: Path
    subscription: str | None = None
    position: int | None = None

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            raise Fatal(f"cannot read the state file {path}: {exc}") from exc
        sub, pos = data.get("subscription"), data.get("position")
        return cls(
            path,
            sub if isinstance(sub, str) else None,
            pos if isinstance(pos, int) else None,
        )

    def save(self) -> None:
        # Write-then-rename: a crash mid-write must not leave a truncated file behind.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"subscription": self.subscription, "position": self.position}))
        os.replace(tmp, self.path)

    def forget_subscription(self) -> None:
        self.subscription, self.position = None, None
        self.save()


def default_state_path(settings: Settings, client_id: str, user: str) -> Path:
    # quote() keeps distinct users distinct and the name a single path component.
    return settings.data / "listen" / f"{quote(client_id, safe='')}-{quote(user, safe='@')}.json"


# --- tokens ----------------------------------------------------------------------------------


@dataclass
class Tokens:
    """The delegated token: a fixed one (--token), or minted by the embedded issuer and minted
    again when little of its lifetime is left."""

    client_id: str
    user: str
    ttl: int
    issuer: LocalIssuer | None = None
    fixed: str | None = None
    _token: str = ""
    _expires: float = 0.0

    def get(self) -> str:
        if self.fixed is not None:
            return self.fixed
        if time.monotonic() > self._expires - min(300.0, self.ttl / 5):
            self.renew()
        return self._token

    def renew(self) -> None:
        if self.issuer is None:
            raise Fatal("the token has expired; start again with a fresh --token/HERALD_TOKEN")
        self._token = self.issuer.mint(
            client_id=self.client_id, user_id=self.user, ttl_seconds=self.ttl
        )
        self._expires = time.monotonic() + self.ttl


# --- output ----------------------------------------------------------------------------------


@dataclass
class Printer:
    as_json: bool
    verbose: bool

    def message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind in CHANGES:
            click.echo(json.dumps(msg) if self.as_json else human(msg))
        elif kind in ("ready", "keepalive"):
            if self.verbose:
                click.echo(
                    json.dumps(msg) if self.as_json else f"{_now()}  {kind}", err=not self.as_json
                )
        elif self.as_json:
            click.echo(json.dumps(msg))


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


def human(msg: dict[str, Any]) -> str:
    """One line: time, type, content, group, read/action state, position."""
    parts = [_now(), f"{msg['type']:<7}"]
    n = msg.get("notification")
    if isinstance(n, dict):
        parts.append(_content(n.get("payload") or {}))
        if n.get("groupName"):
            parts.append(f"group={n['groupName']}")
        parts.append(f"{n.get('readState', '?')}/{n.get('userActionState', '?')}")
    else:
        parts.append(f"id={msg.get('id', '?')}")
    parts.append(f"#{msg.get('position')}")
    return "  ".join(parts)


def _content(payload: dict[str, Any]) -> str:
    visual = payload.get("visualContent")
    if isinstance(visual, dict):
        title, body = visual.get("title", ""), visual.get("body")
        return f"{title} — {body}" if body else str(title)
    return f"raw: {payload.get('rawContent', '')}"


# --- the device ------------------------------------------------------------------------------


@dataclass
class Closed:
    """How a stream ended: the close code, the `closing` reason, and how long it lived."""

    code: int | None
    reason: str | None
    seconds: float


@dataclass
class Listener:
    base: str
    host_name: str
    tokens: Tokens
    state: State
    printer: Printer
    settings: Settings
    count: int | None
    printed: int = 0
    ready: bool = False
    http: httpx.AsyncClient = field(init=False)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=f"{self.base}/beta", timeout=10) as self.http:
            delays = backoff()
            while True:
                self.ready = False
                step = await self._connect_once()
                if self.ready:  # the server was up: the next failure starts again at 1 s
                    delays = backoff()
                if step == "backoff":
                    await asyncio.sleep(next(delays))

    async def _connect_once(self) -> Next:
        """One subscription check and one stream; raises Fatal or Done to stop."""
        try:
            await self._ensure_subscription()
            closed = await self._stream()
        except (OSError, httpx.TransportError, InvalidHandshake, TimeoutError) as exc:
            return self._failed(exc)
        except Retry as exc:
            say(str(exc))
            return "backoff"
        return self._after(closed)

    def _failed(self, exc: Exception) -> Next:
        if isinstance(exc, InvalidStatus):
            return self._refused(exc.response.status_code, bytes(exc.response.body or b""))
        say(f"cannot reach {self.base} ({exc or type(exc).__name__}); retrying")
        return "backoff"

    def _refused(self, status: int, body: bytes) -> Next:
        """The WebSocket handshake answered with an HTTP error (a Graph error body)."""
        detail = graph_error(status, body)
        if status == 404:
            say(f"subscription {self.state.subscription} is gone ({detail}); registering a new one")
            self.state.forget_subscription()
            return "backoff"  # not "now": a server without streams would have us register forever
        if status == 410:
            self._resync()
            return "now"
        if 400 <= status < 500 and status != 429:  # 401, 403, 400: retrying cannot help
            raise Fatal(f"the server refused the stream: {detail}")
        say(f"the server answered {detail}; retrying")
        return "backoff"

    def _after(self, closed: Closed) -> Next:
        """Decide what follows a stream that ended."""
        planned: Next = "now" if closed.seconds >= HEALTHY_SECONDS else "backoff"
        if closed.code == TOKEN_EXPIRED or closed.reason == "tokenExpired":
            self.tokens.renew()
            return planned
        if closed.code == SUBSCRIPTION_GONE or closed.reason == "subscriptionGone":
            say(f"subscription {self.state.subscription} is gone; registering a new one")
            self.state.forget_subscription()
            return planned
        if closed.reason == "tooSlow":
            say("the server dropped this slow client; resuming")
            return planned
        if closed.code == RESYNC_REQUIRED or closed.reason == "resyncRequired":
            self._resync()
            return planned
        say(f"connection closed ({closed.reason or closed.code}); reconnecting")
        return "backoff"

    def _resync(self) -> None:
        say(
            f"changes after position {self.state.position} are no longer kept by the server;"
            " continuing from now (some changes were missed)"
        )
        self.state.position = None
        self.state.save()

    # subscriptions

    async def _ensure_subscription(self) -> None:
        """Reuse the saved subscription (renewing it when it nears expiry) or register one."""
        if self.state.subscription is not None:
            found = await self._call(
                "GET", f"/me/notificationSubscriptions/{self.state.subscription}"
            )
            if found is not None:
                await self._renew_if_due(found)
                return
            say(f"subscription {self.state.subscription} is gone; registering a new one")
            self.state.forget_subscription()
        body = {
            "application": self.host_name,
            "platform": "live",
            "displayName": f"herald listen on {socket.gethostname()}",
        }
        created = await self._call("POST", "/me/notificationSubscriptions", body)
        if created is None:
            raise Retry("registering the subscription answered 404; retrying")
        self.state.subscription, self.state.position = str(created["id"]), None
        self.state.save()
        say(f"registered subscription {self.state.subscription}")

    async def _renew_if_due(self, sub: dict[str, Any]) -> None:
        expires = parse_time(sub.get("expirationDateTime"))
        if expires is not None and expires - datetime.now(UTC) > RENEW_WITHIN:
            return
        until = datetime.now(UTC) + timedelta(seconds=self.settings.subscription_ttl)
        body = {"expirationDateTime": until.strftime("%Y-%m-%dT%H:%M:%SZ")}
        await self._call("PATCH", f"/me/notificationSubscriptions/{sub['id']}", body)

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any] | None:
        """A subscription request; None for 404. Auth errors are fatal, 5xx/429 are retried."""
        headers = {"Authorization": f"Bearer {self.tokens.get()}"}
        response = await self.http.request(method, path, json=body, headers=headers)
        if response.status_code == 404:
            return None
        if response.status_code == 429 or response.status_code >= 500:
            raise Retry(f"{method} {path}: {graph_error(response.status_code, response.content)}")
        if response.status_code >= 400:
            raise Fatal(f"{method} {path}: {graph_error(response.status_code, response.content)}")
        result: dict[str, Any] = response.json()
        return result

    # the stream

    async def _stream(self) -> Closed:
        started = time.monotonic()
        url = stream_url(self.base, str(self.state.subscription), self.state.position)
        headers = {"Authorization": f"Bearer {self.tokens.get()}"}
        reason: str | None = None
        async with connect(url, additional_headers=headers, open_timeout=10) as ws:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("type") == "closing":
                        reason = msg.get("reason")
                        say(f"server closing the stream: {reason} ({msg.get('message', '')})")
                    await self._handle(msg, ws)
            except ConnectionClosed:
                pass  # an abrupt drop: decided below from the close code
        return Closed(ws.close_code, reason, time.monotonic() - started)

    async def _handle(self, msg: dict[str, Any], ws: ClientConnection) -> None:
        kind, position = msg.get("type"), msg.get("position")
        if kind == "ready":
            self.ready = True
            say(f"listening on subscription {self.state.subscription} (after position {position})")
            if isinstance(position, int) and self.state.position is None:
                # Remember where we started, so a restart before any change still resumes here.
                self.state.position = position
                self.state.save()
        if kind in CHANGES and isinstance(position, int):
            if self.state.position is not None and position <= self.state.position:
                return  # already printed before a reconnect
            self.printer.message(msg)
            self.state.position = position
            self.state.save()
            self.printed += 1
            if self.count is not None and self.printed >= self.count:
                await ws.close()
                raise Done
            return
        self.printer.message(msg)


class Retry(Exception):
    """A transient server answer: wait and try again."""


def backoff() -> Iterator[float]:
    delay = FIRST_DELAY
    while True:
        yield delay
        delay = min(delay * 2, MAX_DELAY)


def stream_url(base: str, subscription: str, after: int | None) -> str:
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = f"{parts.path.rstrip('/')}/beta/me/notificationSubscriptions/{subscription}/stream"
    query = f"after={after}" if after is not None else ""
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def graph_error(status: int, body: bytes | None) -> str:
    """`403 accessDenied: message` from a Graph error body, or the bare status."""
    try:
        error = json.loads(body or b"")["error"]
        return f"{status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return str(status)


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- the command -----------------------------------------------------------------------------


@click.command("listen")
@click.option("--app", "client_id", required=True, help="The app's client id.")
@click.option("--user", required=True, help="The user whose notifications to receive.")
@click.option("--url", help="Herald's base URL (HERALD_URL; default: the configured one).")
@click.option(
    "--token",
    envvar="HERALD_TOKEN",
    help="A delegated token to use (HERALD_TOKEN) instead of minting one with the embedded issuer.",
)
@click.option("--host-name", help="The app's host name; skips looking the app up in the store.")
@click.option("--json", "as_json", is_flag=True, help="Print each message as one JSON line.")
@click.option("--verbose", is_flag=True, help="Print ready and keepalive messages too.")
@click.option(
    "--state",
    "state_file",
    type=click.Path(dir_okay=False),
    help="State file (default DATA/listen/<client id>-<user>.json).",
)
@click.option("--once", is_flag=True, help="Exit after the first change.")
@click.option("--count", type=click.IntRange(min=1), help="Exit after N changes.")
@common_options
def listen(
    client_id: str,
    user: str,
    url: str | None,
    token: str | None,
    host_name: str | None,
    as_json: bool,
    verbose: bool,
    state_file: str | None,
    once: bool,
    count: int | None,
    **options: str | None,
) -> None:
    """Act as a device of USER of the app: print notifications as they arrive."""
    settings = load_settings(**options)
    host = host_name or run(find_app(settings, client_id)).host_name
    path = Path(state_file) if state_file else default_state_path(settings, client_id, user)
    listener = Listener(
        base=(url or os.environ.get("HERALD_URL") or settings.base_url).rstrip("/"),
        host_name=host,
        tokens=_tokens(settings, client_id, user, token),
        state=State.load(path),
        printer=Printer(as_json, verbose),
        settings=settings,
        count=1 if once else count,
    )
    asyncio.run(_until_stopped(listener))


def _tokens(settings: Settings, client_id: str, user: str, token: str | None) -> Tokens:
    if token:
        return Tokens(client_id, user, settings.token_ttl, fixed=token)
    if not settings.local_issuer:
        raise Fatal("the embedded issuer is disabled (local_issuer = false); give --token")
    settings.data.mkdir(parents=True, exist_ok=True)
    issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    return Tokens(client_id, user, settings.token_ttl, issuer=issuer)


async def _until_stopped(listener: Listener) -> None:
    """Run until --count is reached or SIGINT/SIGTERM arrives; both end with status 0."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(Done, asyncio.CancelledError):
        await listener.run()
    sys.stdout.flush()


def register(group: click.Group) -> None:
    group.add_command(listen)
