"""Harness for the web inbox's browser tests (tests/test_inbox.py, docs/inbox.md).

- `Herald`: a real `herald serve` subprocess (tests/processes.py) on its own data directory, with
  the CLI run against the same data and store (`herald app create`, `herald signin`,
  `herald token`), killed and restarted on the same port at will.
- `Api`: Herald's HTTP API as the app server (app-only token: posts and reads the user's
  notifications) and as the user (delegated token: the user's subscriptions).
- `Device`: a Chromium profile (a persistent context: incognito contexts have no Push API), i.e.
  one browser of the user; its pages are the tabs. Every console error and uncaught exception of
  every page and worker is recorded; `Device.check()` fails the test on any that the test did not
  expect (only Chromium's own network messages, and only where a test allows them).
- `Inbox`: the page as the contract describes it (ids, roles, data-* attributes, button names).
- Screenshots go to `$HERALD_TEST_ARTIFACTS/inbox/` (default `<repo>/test-artifacts/inbox/`).

Playwright's sync API is used from plain `def test_…` functions (no event loop may be running).
Every wait is bounded (`WAIT_MS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pytest

from tests.conftest import free_port
from tests.processes import start
from tests.pushes import wait_for

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by require_browser(): a skip locally, a failure in CI
    expect = sync_playwright = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from playwright.sync_api import (
        BrowserContext,
        CDPSession,
        ConsoleMessage,
        Locator,
        Page,
        Playwright,
        WebError,
    )

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
WAIT_MS = 15_000  # the longest any single wait on the page may take
WAIT = WAIT_MS / 1000
FEED = "/beta/me/notifications"
SUBS = "/beta/me/notificationSubscriptions"
T = TypeVar("T")

if expect is not None:
    expect.set_options(timeout=WAIT_MS)


def missing(problem: str) -> None:
    """Skip locally; fail in CI, where nothing may be skipped (conftest, tests/pg.py)."""
    if os.environ.get("CI"):
        pytest.fail(problem)
    pytest.skip(problem)


def require_browser() -> None:
    """Skip (locally) or fail (CI, where nothing may be skipped) without Playwright or Chromium."""
    problem = None
    if sync_playwright is None:
        problem = "Playwright for Python is not installed (pip install -e '.[test]')"
    elif not os.access(CHROMIUM, os.X_OK):
        problem = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if problem is not None:
        missing(problem)


@contextlib.contextmanager
def clean_environment() -> Iterator[None]:
    """No developer HERALD_* variables reach a `herald` subprocess (as conftest's autouse
    fixture does for function-scoped code; module-scoped fixtures run before it)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if _developer_setting(key):
                mp.delenv(key)
        yield


def _developer_setting(key: str) -> bool:
    return key.startswith("HERALD_") and not key.startswith("HERALD_TEST_")


# -- Herald -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    client_id: str
    host_name: str


@dataclass
class Herald:
    """`herald serve` as a subprocess on `data` (SQLite there, or `store_url`), with `env`
    (HERALD_* settings) given to it and to every CLI command run on its data."""

    data: Path
    store_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inbox(self, query: str = "") -> str:
        return f"{self.origin}/inbox/{query}"

    def start(self) -> Herald:
        """Start (or restart, on the same port and data) and wait until it is ready."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with clean_environment():
            self.proc = start(self.data, self.port, self.store_url, **self.env)
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, streams just drop."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        path = self.data / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str) -> str:
        """`herald ARGS --data … [--store …]` in a subprocess; its standard output."""
        command = [sys.executable, "-m", "herald", *args, "--data", str(self.data)]
        if self.store_url:
            command += ["--store", self.store_url]
        environment = {k: v for k, v in os.environ.items() if not _developer_setting(k)}
        result = subprocess.run(
            command, env=environment | self.env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def register(self, host_name: str | None = None) -> App:
        host = host_name or f"inbox-{uuid.uuid4().hex[:8]}.example.com"
        info = json.loads(self.cli("app", "create", "--host-name", host))
        return App(info["clientId"], info["hostName"])

    def signin(self, app: App, user: str, *, ttl: int | None = None) -> str:
        """`herald signin --app … --user …`: the sign-in link it prints (docs/inbox.md)."""
        args = ["signin", "--app", app.client_id, "--user", user, "--port", str(self.port)]
        if ttl is not None:
            args += ["--ttl", str(ttl)]
        lines = [line for line in self.cli(*args).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        link = lines[0].strip()
        expected = re.escape(f"{self.origin}/inbox/?app={app.client_id}") + r"#signin=[\w.-]+"
        assert re.fullmatch(expected, link), link
        return link

    def token(self, app: App, user: str | None = None) -> str:
        """`herald token --app … [--user …]`: a delegated (or app-only) access token."""
        args = ["token", "--app", app.client_id] + (["--user", user] if user else [])
        return self.cli(*args).strip()

    def push_key(self, app: App) -> str:
        """`herald app push-key`: the app's VAPID public key (base64url)."""
        return self.cli("app", "push-key", app.host_name).strip()


class Api:
    """Herald's API for one user of one app: `app` is the app server (an app-only token),
    `me` the user (a delegated token). No keep-alive, so a restarted server is just reached."""

    def __init__(self, herald: Herald, app: App, user: str) -> None:
        self.herald, self.app, self.user = herald, app, user
        with ThreadPoolExecutor(2) as pool:  # two `herald token` processes at once
            app_only, delegated = pool.map(lambda u: herald.token(app, u), [None, user])
        self.app_server = self._client(app_only)
        self.me = self._client(delegated)

    def _client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.herald.origin,
            headers={"Authorization": f"Bearer {token}"},
            timeout=WAIT,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def close(self) -> None:
        self.app_server.close()
        self.me.close()

    def notify(
        self, title: str, body: str | None = None, *, status: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """POST /beta/users/{user}/notifications as the app server; the notification."""
        visual = {"title": title} | ({"body": body} if body is not None else {})
        doc: dict[str, Any] = {
            "targetHostName": self.app.host_name,
            "appNotificationId": f"n-{uuid.uuid4().hex[:12]}",
            "payload": {"visualContent": visual},
        }
        doc.update(fields)
        r = self.app_server.post(f"/beta/users/{self.user}/notifications", json=doc)
        assert r.status_code in ((status,) if status else (200, 201)), r.text
        return dict(r.json())

    def notification(self, id: str) -> httpx.Response:
        """GET /beta/users/{user}/notifications/{id} as the app server."""
        return self.app_server.get(f"/beta/users/{self.user}/notifications/{id}")

    def state(self, id: str) -> dict[str, Any]:
        r = self.notification(id)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_state(self, id: str, **expected: str) -> dict[str, Any]:
        """Poll the notification until its fields have `expected` values (the page's PATCH may
        still be on its way when the page already shows the change)."""

        def probe() -> dict[str, Any] | None:
            doc = self.state(id)
            return doc if all(doc.get(k) == v for k, v in expected.items()) else None

        return wait_for(probe, f"notification {id} to have {expected}")

    def wait_gone(self, id: str) -> None:
        wait_for(lambda: self.notification(id).status_code == 404, f"{id} to be deleted (404)")

    def subscriptions(self) -> list[dict[str, Any]]:
        """GET /beta/me/notificationSubscriptions as the user."""
        r = self.me.get(SUBS)
        assert r.status_code == 200, r.text
        return list(r.json()["value"])


# -- the browser --------------------------------------------------------------------------------


def artifacts() -> Path:
    root = os.environ.get("HERALD_TEST_ARTIFACTS") or str(REPO / "test-artifacts")
    path = Path(root) / "inbox"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Allowed:
    """A console error a test expects: its text matches `text` and, when given, the URL it is
    about (the console message's location) matches `url`."""

    text: str
    url: str | None = None

    def matches(self, text: str, url: str) -> bool:
        if not re.search(self.text, text):
            return False
        return self.url is None or re.search(self.url, url) is not None


# Chromium's own messages while Herald is down (tests that stop the server allow these only).
SERVER_DOWN = (
    Allowed(
        r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/[^']*' failed: "
        r"Error in connection establishment: net::ERR_CONNECTION_REFUSED$"
    ),
    Allowed(r"^Failed to load resource: net::ERR_CONNECTION_REFUSED$"),
)


def http_error(status: int, url: str) -> Allowed:
    """Chromium's console line for a response with `status` from a URL matching `url`."""
    return Allowed(
        rf"^Failed to load resource: the server responded with a status of {status}\b", url
    )


class Browser:
    """Playwright (one driver per test module) and where this test's profiles and shots go."""

    def __init__(self, playwright: Playwright, profiles: Path, test_name: str) -> None:
        self.playwright = playwright
        self.profiles = profiles
        self.test_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", test_name).strip("-")
        self.devices: list[Device] = []

    def device(self, name: str, *, init_script: str | None = None) -> Device:
        """A new browser profile (the user's laptop, phone, …) named `name` in the shots."""
        device = Device(self, name, init_script)
        self.devices.append(device)
        return device

    def shot_path(self, step: str) -> Path:
        return artifacts() / f"{self.test_name}-{step}.png"

    def close(self) -> None:
        while self.devices:
            self.devices.pop().close()

    def check(self) -> None:
        """No device had an unexpected console error or uncaught exception."""
        problems = [p for d in self.devices for p in d.problems]
        assert not problems, "console errors or uncaught exceptions:\n" + "\n".join(problems)


class Device:
    """One Chromium profile: a persistent context (its own user data directory)."""

    def __init__(self, browser: Browser, name: str, init_script: str | None) -> None:
        self.browser = browser
        self.name = name
        self.profile = browser.profiles / f"{name}-{uuid.uuid4().hex[:6]}"
        self.context: BrowserContext = browser.playwright.chromium.launch_persistent_context(
            str(self.profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 900, "height": 760},
            locale="en-US",
            timezone_id="UTC",
        )
        self.context.set_default_timeout(WAIT_MS)
        self.context.set_default_navigation_timeout(WAIT_MS)
        self.problems: list[str] = []
        self.tolerated: list[str] = []
        self.allowed: list[Allowed] = []
        self.context.on("console", self._console)
        self.context.on("weberror", self._weberror)
        if init_script is not None:
            self.context.add_init_script(init_script)
        self._spare: list[Page] = list(self.context.pages)  # the profile's first (blank) tab
        self.tabs: list[Inbox] = []

    def allow(self, *allowed: Allowed) -> None:
        self.allowed.extend(allowed)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        text = message.text
        url = str(message.location.get("url", "")) if message.location else ""
        where = f"{self.name}: console.error ({url}): {text}"
        if any(a.matches(text, url) for a in self.allowed):
            self.tolerated.append(where)
        else:
            self.problems.append(where)

    def _weberror(self, error: WebError) -> None:
        e = error.error
        self.problems.append(f"{self.name}: uncaught {e.name}: {e.message}\n{e.stack or ''}")

    def tab(self) -> Page:
        return self._spare.pop() if self._spare else self.context.new_page()

    def open(
        self, url: str, *, tab: str | None = None, setup: Callable[[Page], None] | None = None
    ) -> Inbox:
        """Open `url` in a new tab of this browser (`setup` sees the tab first); the page."""
        page = self.tab()
        inbox = Inbox(page, self, tab or f"{self.name}{len(self.tabs) + 1 if self.tabs else ''}")
        self.tabs.append(inbox)
        if setup is not None:
            setup(page)
        page.goto(url)
        return inbox

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()


def signed_in(device: Device, herald: Herald, app: App, user: str, **kw: Any) -> Inbox:
    """Open a fresh `herald signin` link in `device`: the page exchanges the code, takes it out of
    the address bar and goes live."""
    inbox = device.open(herald.signin(app, user), **kw)
    inbox.expect_live()
    assert "signin=" not in inbox.page.url, inbox.page.url
    return inbox


class Inbox:
    """The inbox page in one tab, through the structure docs/inbox.md promises."""

    def __init__(self, page: Page, device: Device, name: str) -> None:
        self.page = page
        self.device = device
        self.name = name

    # -- parts of the page

    @property
    def connection(self) -> Locator:
        return self.page.locator("#connection")

    @property
    def alert(self) -> Locator:
        return self.page.locator("#alert")

    @property
    def empty(self) -> Locator:
        return self.page.locator("#empty")

    @property
    def items(self) -> Locator:
        return self.page.locator("#feed > li")

    def item(self, id: str) -> Locator:
        return self.page.locator(f'#feed > li[data-id="{id}"]')

    def button(self, id: str, name: str) -> Locator:
        return self.item(id).get_by_role("button", name=name, exact=True)

    # -- expectations (each bounded)

    def expect_state(self, state: str, timeout: float = WAIT_MS) -> None:
        expect(self.connection).to_have_attribute("data-state", state, timeout=timeout)

    def expect_live(self, timeout: float = WAIT_MS) -> None:
        self.expect_state("live", timeout)
        expect(self.connection).to_contain_text("Live")

    def expect_feed(self, ids: list[str], timeout: float = WAIT_MS) -> None:
        """Exactly these notifications, in this order (newest first), each shown once."""
        expect(self.items).to_have_count(len(ids), timeout=timeout)
        for i, id in enumerate(ids):
            expect(self.items.nth(i)).to_have_attribute("data-id", id, timeout=timeout)
        if ids:
            expect(self.empty).to_be_hidden()
        else:
            expect(self.empty).to_be_visible()

    def expect_shown(
        self, id: str, title: str, body: str | None = None, group: str | None = None
    ) -> None:
        item = self.item(id)
        expect(item).to_have_count(1)
        expect(item.locator("h2")).to_have_text(title)
        if body is not None:
            expect(item.locator("p").filter(has_text=body).first).to_be_visible()
        if group is not None:
            expect(item).to_contain_text(group)
        expect(item.locator("time[datetime]")).to_have_count(1)

    def ids(self) -> list[str]:
        return list(self.items.evaluate_all("items => items.map(li => li.dataset.id)"))

    def shot(self, step: str) -> Path:
        """A full-page screenshot: `<test>-<tab>-<step>.png` under the artefacts."""
        path = self.device.browser.shot_path(f"{self.name}-{step}")
        self.page.screenshot(path=str(path), full_page=True)
        return path


def launch_playwright() -> Iterator[Playwright]:
    """The Playwright driver (for a module-scoped fixture: each device launches its own
    Chromium, so one driver serves a whole module)."""
    require_browser()
    with sync_playwright() as p:
        yield p


# -- Web Push in the browser --------------------------------------------------------------------

# Chromium's push service (FCM) is out of reach here, so PushManager is replaced by one that
# "subscribes" to the Web Push stand-in: it records the applicationServerKey the page passes and
# answers with the subscription the test made (tests/standins/webpush.py keeps its private key
# and decrypts every push). Everything else (permission, service worker, showNotification) is
# Chromium's own.
PUSH_STANDIN = """
(() => {
  if (typeof PushManager === "undefined") return;
  const subscription = %(subscription)s;
  const STORED = "herald-test.push-subscribed";
  const record = (globalThis.__heraldTestPush = { keys: [], calls: [] });
  const b64url = (bytes) =>
    btoa(String.fromCharCode(...bytes))
      .replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
  const bytes = (b64) => {
    const s = atob(b64.replace(/-/g, "+").replace(/_/g, "/"));
    return Uint8Array.from(s, (c) => c.charCodeAt(0));
  };
  const keyText = (key) => {
    if (key == null) return null;
    if (typeof key === "string") return b64url(bytes(key));
    if (key instanceof ArrayBuffer) return b64url(new Uint8Array(key));
    return b64url(new Uint8Array(key.buffer, key.byteOffset, key.byteLength));
  };
  const made = (key) => ({
    endpoint: subscription.endpoint,
    expirationTime: null,
    options: { userVisibleOnly: true, applicationServerKey: key ? bytes(key).buffer : null },
    getKey: (name) => (subscription.keys[name] ? bytes(subscription.keys[name]).buffer : null),
    toJSON: () => ({ endpoint: subscription.endpoint, expirationTime: null,
                     keys: { ...subscription.keys } }),
    unsubscribe: () => { localStorage.removeItem(STORED); return Promise.resolve(true); },
  });
  PushManager.prototype.subscribe = function (options) {
    record.calls.push("subscribe");
    const key = keyText(options && options.applicationServerKey);
    record.keys.push(key);
    localStorage.setItem(STORED, JSON.stringify(key));
    return Promise.resolve(made(key));
  };
  PushManager.prototype.getSubscription = function () {
    record.calls.push("getSubscription");
    const stored = localStorage.getItem(STORED);
    return Promise.resolve(stored === null ? null : made(JSON.parse(stored)));
  };
})();
"""


def push_standin_script(subscription: dict[str, Any]) -> str:
    """The init script for a device whose browser "subscribes" with `subscription`
    (`Subscriber.to_json()` of the Web Push stand-in)."""
    return PUSH_STANDIN % {"subscription": json.dumps(subscription)}


def deliver_push(page: Page, origin: str, data: str) -> None:
    """Deliver a push message (the decrypted text) to the service worker registered for
    `<origin>/inbox/`, as the push service would: CDP ServiceWorker.deliverPushMessage. Only to
    an activated worker: one still activating (slow on a loaded machine) drops the message."""
    poll_page(
        page,
        lambda: page.evaluate(
            """async () => (await navigator.serviceWorker.getRegistration("/inbox/"))
                ?.active?.state === "activated" """
        ),
        "the service worker to be activated",
    )
    cdp: CDPSession = page.context.new_cdp_session(page)
    registrations: dict[str, dict[str, Any]] = {}

    def updated(event: dict[str, Any]) -> None:
        for registration in event["registrations"]:
            registrations[registration["registrationId"]] = registration

    cdp.on("ServiceWorker.workerRegistrationUpdated", updated)
    cdp.send("ServiceWorker.enable")
    deadline = time.monotonic() + WAIT
    while True:
        ours = [
            r["registrationId"]
            for r in registrations.values()
            if r["scopeURL"] == f"{origin}/inbox/" and not r.get("isDeleted")
        ]
        if ours:
            break
        assert time.monotonic() < deadline, f"no service worker registration: {registrations}"
        page.wait_for_timeout(50)  # lets Playwright dispatch the CDP events
    assert len(ours) == 1, registrations
    cdp.send(
        "ServiceWorker.deliverPushMessage",
        {"origin": origin, "registrationId": ours[0], "data": data},
    )
    cdp.detach()


def shown_notifications(page: Page) -> list[dict[str, Any]]:
    """What the service worker shows now: registration.getNotifications() (in an /inbox/ page)."""
    return list(
        page.evaluate(
            """async () => {
                const registration = await navigator.serviceWorker.getRegistration("/inbox/");
                if (!registration) return [];
                const shown = await registration.getNotifications();
                return shown.map((n) => ({ title: n.title, body: n.body, tag: n.tag }));
            }"""
        )
    )


def poll_page(page: Page, probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Poll `probe` (something evaluated in the page) until it gives something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        page.wait_for_timeout(100)


# -- the page's files, for a page served while Herald is down -----------------------------------


def inbox_files() -> list[str]:
    """The names of the files Herald serves under /inbox/ (src/herald/web/ and config.json)."""
    web = resources.files("herald") / "web"
    return sorted({f.name for f in web.iterdir() if f.is_file()} | {"config.json"})


@dataclass(frozen=True)
class Served:
    status: int
    headers: dict[str, str]
    body: bytes


def capture_inbox(herald: Herald) -> dict[str, Served]:
    """Every /inbox/ file as Herald serves it now (status, headers, body), by path: what a
    browser cache would hold."""
    out: dict[str, Served] = {}
    with httpx.Client(base_url=herald.origin, timeout=WAIT, trust_env=False) as client:
        for name in inbox_files():
            r = client.get(f"/inbox/{name}")
            if r.status_code != 200:
                continue
            # httpx hands back the decoded body: drop what described the encoded one.
            encoded = ("content-length", "content-encoding")
            headers = {k: v for k, v in r.headers.items() if k.lower() not in encoded}
            out[f"/inbox/{name}"] = Served(r.status_code, headers, r.content)
    out["/inbox/"] = out["/inbox/index.html"]
    return out
