"""Helpers for the push tests (tests/test_push.py, tests/test_push_faults.py): Herald pointed at
the verifying stand-ins (tests/standins), an app's credentials set with the real CLI, a user with
devices, the message Herald should send (docs/push.md, computed here independently of
src/herald/outbound/providers), and bounded waits."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from herald.cli import main
from tests.conftest import RegisteredApp, Server
from tests.standins import (
    ApnsStandIn,
    FcmStandIn,
    StandIn,
    TlsFiles,
    WebPushStandIn,
    WnsStandIn,
)
from tests.standins.base import Delivery

WAIT = 20.0  # the longest a single wait may take before the test fails
SUBS = "/beta/me/notificationSubscriptions"
FEED = "/beta/me/notifications"
T = TypeVar("T")


# -- the stand-ins and Herald's settings --------------------------------------------------------


@dataclass
class Providers:
    """One running stand-in per push service (and a second APNs one: the development host)."""

    tls: TlsFiles
    webpush: WebPushStandIn
    apns: ApnsStandIn
    apns_dev: ApnsStandIn
    fcm: FcmStandIn
    wns: WnsStandIn
    credentials: Path  # where key files for the CLI are written

    @property
    def all(self) -> list[StandIn]:
        return [self.webpush, self.apns, self.apns_dev, self.fcm, self.wns]

    def settings(self, **overrides: object) -> dict[str, object]:
        """Herald's settings pointing every push service at its stand-in, with short retries."""
        values: dict[str, object] = {
            "push_ca_file": str(self.tls.ca_file),
            "push_apns_production_url": self.apns.url,
            "push_apns_development_url": self.apns_dev.url,
            "push_fcm_url": self.fcm.url,
            "push_wns_token_url": self.wns.token_url,
            "push_wns_hosts": "127.0.0.1",
            "push_allow_private_endpoints": True,  # the Web Push stand-in is on 127.0.0.1
            "push_vapid_subject": "mailto:push-tests@example.com",
            "push_timeout": 2.0,
            "push_lease": 5.0,
            "push_backoff_base": 0.2,
            "push_backoff_max": 1.0,
            "push_max_attempts": 8,
        }
        values.update(overrides)
        return values

    def env(self, **overrides: object) -> dict[str, str]:
        """The same settings as HERALD_* variables (for `herald serve` as a subprocess)."""
        return {f"HERALD_{k.upper()}": str(v) for k, v in self.settings(**overrides).items()}


def providers(tls: TlsFiles, directory: Path, ports: dict[str, int] | None = None) -> Providers:
    """Start the stand-ins (on fixed ports where `ports` names them: a stand-in restarted on its
    port keeps its URL, which Herald was configured with)."""
    ports = ports or {}
    directory.mkdir(parents=True, exist_ok=True)
    made = Providers(
        tls=tls,
        webpush=WebPushStandIn(tls, port=ports.get("webpush", 0)),
        apns=ApnsStandIn(tls, environment="production", port=ports.get("apns", 0)),
        apns_dev=ApnsStandIn(tls, environment="development"),
        fcm=FcmStandIn(tls, port=ports.get("fcm", 0)),
        wns=WnsStandIn(tls, port=ports.get("wns", 0)),
        credentials=directory,
    )
    started: list[StandIn] = []
    try:
        for standin in made.all:
            standin.start()
            started.append(standin)
    except BaseException:
        for standin in started:
            standin.stop()
        raise
    return made


def stop_providers(p: Providers) -> None:
    for standin in p.all:
        standin.stop()


# -- the CLI ------------------------------------------------------------------------------------


def cli(server: Server, *args: str, ok: bool = True, input: str | None = None) -> Result:
    """`herald ARGS --data … --store …` on the server's data and store (in this process)."""
    result = CliRunner().invoke(main, [*args, *server.cli_args], input=input)
    if ok:
        assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def set_apns(
    server: Server,
    app: RegisteredApp,
    apns: ApnsStandIn,
    directory: Path,
    *,
    environment: str | None = None,
    key_file: Path | None = None,
    key_id: str | None = None,
) -> Result:
    args = [
        "app",
        "push-set",
        "apns",
        app.host_name,
        "--key-file",
        str(key_file or apns.write_key(directory)),
        "--key-id",
        key_id or apns.key_id,
        "--team-id",
        apns.team_id,
        "--topic",
        apns.topic,
    ]
    if environment is not None:
        args += ["--environment", environment]
    return cli(server, *args)


def set_fcm(server: Server, app: RegisteredApp, fcm: FcmStandIn, directory: Path) -> Result:
    path = fcm.write_service_account(directory)
    return cli(server, "app", "push-set", "fcm", app.host_name, "--service-account", str(path))


def set_wns(server: Server, app: RegisteredApp, wns: WnsStandIn, secret: str = "") -> Result:
    """As documented: the client secret is typed at the prompt (not in the command line)."""
    return cli(
        server,
        *("app", "push-set", "wns", app.host_name, "--client-id", wns.client_id),
        input=f"{secret or wns.client_secret}\n",
    )


def configure_app(server: Server, p: Providers) -> RegisteredApp:
    """A new app with APNs, FCM and WNS credentials of the stand-ins (Web Push needs none: its
    VAPID key is made on first use)."""
    app = server.register()
    set_apns(server, app, p.apns, p.credentials)
    set_fcm(server, app, p.fcm, p.credentials)
    set_wns(server, app, p.wns)
    return app


# -- a user and their devices -------------------------------------------------------------------


@dataclass
class Device:
    """A subscription of the user; `target` is the stand-in's key for its channel."""

    id: str
    platform: str
    target: str
    channel: dict[str, Any] | None
    standin: StandIn | None


@dataclass
class User:
    server: Server
    app: RegisteredApp
    id: str = field(default_factory=lambda: f"user-{uuid.uuid4()}")

    def __post_init__(self) -> None:
        self.me = self.server.client(self.server.token(self.app, self.id))
        self.backend = self.server.client(self.server.token(self.app, None))

    # -- devices

    def subscribe(
        self, platform: str, channel: dict[str, Any] | None, standin: StandIn | None = None
    ) -> Device:
        body: dict[str, Any] = {"application": self.app.host_name, "platform": platform}
        if channel is not None:
            body["pushChannel"] = channel
        r = self.me.post(SUBS, json=body)
        assert r.status_code == 201, r.text
        sub = r.json()
        target = ""
        if standin is not None and channel is not None:
            target = standin.target_of(_channel_value(channel))
        return Device(sub["id"], platform, target, channel, standin)

    def webpush(self, standin: WebPushStandIn) -> Device:
        key = self.me.get("/beta/webPushKey")
        assert key.status_code == 200, key.text
        channel = standin.subscribe(key.json()["applicationServerKey"])
        return self.subscribe("webPush", channel, standin)

    def ios(self, standin: ApnsStandIn) -> Device:
        return self.subscribe("iOS", {"deviceToken": standin.new_token()}, standin)

    def android(self, standin: FcmStandIn) -> Device:
        return self.subscribe("android", {"registrationToken": standin.new_token()}, standin)

    def windows(self, standin: WnsStandIn) -> Device:
        return self.subscribe("windows", {"channelUri": standin.new_channel()}, standin)

    def subscription(self, device: Device) -> dict[str, Any]:
        r = self.me.get(f"{SUBS}/{device.id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def state(self, device: Device) -> dict[str, Any]:
        return dict(self.subscription(device)["deliveryState"])

    def wait_state(
        self, device: Device, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Poll the subscription's deliveryState until `check` holds."""
        return wait_for(lambda: _if(self.state(device), check), f"{what} (deliveryState)")

    # -- notifications

    def notify(self, status: int = 201, **fields: Any) -> dict[str, Any]:
        """POST a notification to the user as the app's backend (app-only token)."""
        body: dict[str, Any] = {
            "targetHostName": self.app.host_name,
            "appNotificationId": f"n-{uuid.uuid4().hex[:12]}",
            "payload": {"visualContent": {"title": "Hello", "body": "from the push tests"}},
            "expirationDateTime": expires_in(3600),
        }
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        r = self.backend.post(f"/beta/users/{self.id}/notifications", json=body)
        assert r.status_code == status, r.text
        return dict(r.json())

    def patch(
        self, notification: dict[str, Any], body: dict[str, Any], device: Device
    ) -> dict[str, Any]:
        """A change made by `device` (its delegated token, naming itself in X-UNS-ID)."""
        r = self.me.patch(
            f"{FEED}/{notification['id']}", json=body, headers={"X-UNS-ID": device.id}
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    def delete(self, notification: dict[str, Any], device: Device | None = None) -> None:
        headers = {"X-UNS-ID": device.id} if device is not None else {}
        r = self.me.delete(f"{FEED}/{notification['id']}", headers=headers)
        assert r.status_code == 204, r.text

    def head(self) -> int:
        """The user's newest change position (the delta link of a first sync)."""
        url: str | None = f"{FEED}/delta"
        while url is not None:
            r = self.me.get(url)
            assert r.status_code == 200, r.text
            body = r.json()
            url = body.get("@odata.nextLink")
            if url is None:
                link = httpx.URL(body["@odata.deltaLink"])
                return int(link.params["$deltatoken"])
        raise AssertionError("unreachable")


def _channel_value(channel: dict[str, Any]) -> str:
    for key in ("endpoint", "deviceToken", "registrationToken", "channelUri"):
        if key in channel:
            return str(channel[key])
    raise AssertionError(channel)


def _if(value: T, check: Callable[[T], bool]) -> T | None:
    return value if check(value) else None


# -- what Herald sends (docs/push.md), computed independently ------------------------------------


def expires_in(seconds: float) -> str:
    """An expirationDateTime in whole seconds (as every message renders it)."""
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def unix(iso: str) -> int:
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


def message(
    n: dict[str, Any],
    kind: str,
    position: int,
    *,
    truncated: bool = False,
    content: bool = True,
    **changes: Any,
) -> dict[str, Any]:
    """The JSON message for notification `n` (as the API returned it). `content=False` leaves
    title/body/rawContent out (a shoulder tap); `truncated` sets "truncated"."""
    if kind == "remove":
        out: dict[str, Any] = {"type": "remove", "position": position, "id": n["id"]}
        return out | ({"truncated": True} if truncated else {})
    out = {
        "type": kind,
        "position": position,
        "id": n["id"],
        "appNotificationId": n["appNotificationId"],
    }
    if n.get("groupName") is not None:
        out["groupName"] = n["groupName"]
    payload = n["payload"]
    if content:
        visual = payload.get("visualContent")
        if visual is not None:
            out["title"] = visual["title"]
            if visual.get("body") is not None:
                out["body"] = visual["body"]
        if payload.get("rawContent") is not None:
            out["rawContent"] = payload["rawContent"]
    out["priority"] = n["priority"]
    out["readState"] = n["readState"]
    out["userActionState"] = n["userActionState"]
    if n.get("displayTimeToLive") is not None:
        out["displayTimeToLive"] = n["displayTimeToLive"]
    out["expirationDateTime"] = _whole_seconds(n["expirationDateTime"])
    if truncated:
        out["truncated"] = True
    out.update(changes)
    return out


def _whole_seconds(iso: str) -> str:
    at = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def strings(doc: dict[str, Any]) -> dict[str, str]:
    """FCM's data map: every value a string, non-strings JSON-encoded."""
    return {
        k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in doc.items()
    }


def webpush_topic(notification_id: str) -> str:
    digest = hashlib.sha256(notification_id.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


def wns_tag(notification_id: str) -> str:
    ok = len(notification_id) <= 16 and all(
        c.isascii() and (c.isalnum() or c in "-_") for c in notification_id
    )
    if ok:
        return notification_id
    digest = hashlib.sha256(notification_id.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:16]


def apns_collapse_id(notification_id: str) -> str:
    raw = notification_id.encode()
    return notification_id if len(raw) <= 64 else hashlib.sha256(raw).hexdigest()


# -- waiting and observing ----------------------------------------------------------------------


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Poll `probe` until it returns something true (not None, False, empty); fail after
    `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def arrived(device: Device, count: int, *, kind: str | None = None) -> list[Delivery]:
    """Wait until the device's stand-in accepted `count` pushes for it (of `kind`); all of them."""
    assert device.standin is not None
    return device.standin.wait_accepted(count, WAIT, target=device.target, kind=kind)


def by_position(deliveries: list[Delivery]) -> list[Delivery]:
    """Pushes in change order: two pushes sent at once may arrive in either order."""
    return sorted(deliveries, key=lambda d: (int(d.message["position"]), d.seq))


def messages(device: Device) -> list[Any]:
    """The device's messages in change order (WNS removals, which carry none, left out)."""
    assert device.standin is not None
    return [d.message for d in by_position(device.standin.accepted(device.target)) if d.message]


def metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with httpx.Client(base_url=server.base_url, timeout=10, trust_env=False) as client:
        r = client.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def iter_ids(docs: list[Any]) -> Iterator[str]:
    for d in docs:
        if isinstance(d, dict) and "id" in d:
            yield str(d["id"])
