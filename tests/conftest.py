"""Shared fixtures: a real Herald server on a loopback port, apps registered through the CLI,
and tokens minted by the embedded issuer."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from herald.api.app import create_app
from herald.auth.issuer import LocalIssuer
from herald.cli import main
from herald.feed import Clock, utcnow
from herald.server import Server as HeraldServer
from herald.server import config
from herald.settings import Settings
from tests.pg import fresh_database
from tests.redis import RedisServer, redis_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RegisteredApp:
    client_id: str
    client_secret: str
    host_name: str


@dataclass
class Server:
    settings: Settings
    base_url: str
    apps: dict[str, RegisteredApp] = field(default_factory=dict)
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.settings.data

    @property
    def cli_args(self) -> list[str]:
        """The options that point a `herald` command at this server's data and store."""
        args = ["--data", str(self.data)]
        return args + (["--store", self.settings.store_url] if self.settings.store_url else [])

    def register(self, host_name: str | None = None) -> RegisteredApp:
        host = host_name or f"app-{uuid.uuid4().hex[:8]}.example.com"
        result = CliRunner().invoke(main, ["app", "create", "--host-name", host, *self.cli_args])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        app = RegisteredApp(info["clientId"], info["clientSecret"], info["hostName"])
        self.apps[host] = app
        return app

    def token(self, app: RegisteredApp, user: str | None, **kw: object) -> str:
        issuer = LocalIssuer.load_or_create(
            self.data, self.settings.issuer_url, self.settings.audience
        )
        return issuer.mint(client_id=app.client_id, user_id=user, **kw)  # type: ignore[arg-type]

    def expired_token(self, app: RegisteredApp, user: str) -> str:
        """A correctly signed delegated token that expired an hour ago."""
        from joserfc import jwt

        issuer = LocalIssuer.load_or_create(
            self.data, self.settings.issuer_url, self.settings.audience
        )
        now = int(time.time())
        claims = {
            "iss": issuer.issuer,
            "aud": issuer.audience,
            "iat": now - 7200,
            "nbf": now - 7200,
            "exp": now - 3600,
            "azp": app.client_id,
            "scp": "Notifications.ReadWrite.CreatedByApp",
            "oid": user,
            "sub": user,
        }
        header = {"alg": "RS256", "typ": "JWT", "kid": issuer.kid}
        return jwt.encode(header, claims, issuer.key, algorithms=["RS256"])

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.base_url, headers=headers, timeout=10)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        while self.clients:
            self.clients.pop().close()


def serve_in_thread(settings: Settings, clock: Clock = utcnow) -> Iterator[str]:
    """Run Herald under uvicorn in a background thread (on `clock`: tests/clock.py); yield its
    base URL."""
    app = create_app(settings, clock=clock)
    server = HeraldServer(config(app, "127.0.0.1", settings.port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("Herald did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def make_settings(data: Path, **overrides: object) -> Settings:
    port = free_port()
    values: dict[str, object] = {
        "data": data,
        "port": port,
        "app_rate": 100_000.0,
        "app_burst": 100_000,
        "user_rate": 100_000.0,
        "user_burst": 100_000,
        # The push stand-ins listen on 127.0.0.1 (tests/test_push.py checks the default).
        "push_allow_private_endpoints": True,
        # Webhook receivers too (tests/test_webhooks.py; tests/test_changefeed.py checks the
        # default), with short timeouts and retries.
        "webhook_allow_private_endpoints": True,
        "webhook_timeout": 0.5,
        "webhook_backoff_base": 0.2,
        "webhook_backoff_max": 0.8,
        "webhook_give_up": 1.0,
        "webhook_poll_interval": 0.1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A running Herald on SQLite, and again on PostgreSQL: server-level tests run on both."""
    yield from servers(request.param, tmp_path_factory.mktemp("herald"))


def servers(store: str, data: Path, **overrides: object) -> Iterator[Server]:
    """A running Herald on `store` ("sqlite": a file under `data`; "postgres": a fresh schema),
    with these settings overridden; its clients are closed afterwards."""
    if store == "sqlite":
        yield from serve(make_settings(data, **overrides))
        return
    from tests.pg import fresh_database

    for store_url in fresh_database():
        yield from serve(make_settings(data, store_url=store_url, **overrides))


def serve(settings: Settings, clock: Clock = utcnow) -> Iterator[Server]:
    """A running Herald with these settings, on `clock` (tests/clock.py); its clients are
    closed afterwards."""
    for url in serve_in_thread(settings, clock):
        server = Server(settings, url)
        try:
            yield server
        finally:
            server.close_clients()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (SQLite under the data directory), then a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield None
        return
    from tests.pg import fresh_database

    yield from fresh_database()


@pytest.fixture
def app(server: Server) -> Iterator[RegisteredApp]:
    yield server.register()
    server.close_clients()


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4()}"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """Playwright's driver, for a module's browser tests (tests/browser.py)."""
    from tests.browser import launch_playwright

    yield from launch_playwright()


@pytest.fixture
def browser(
    playwright: Any, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """This test's browser profiles (tests/browser.py `Browser`), closed afterwards. Each test
    ends with `browser.check()`: no unexpected console error or uncaught exception."""
    from tests.browser import Browser

    made = Browser(playwright, tmp_path_factory.mktemp("profiles"), request.node.name)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def heralds(tmp_path: Path) -> Iterator[Any]:
    """A browser test's own `herald serve` (tests/browser.py `Herald`):
    `heralds(store_url=None, HERALD_X="…")` starts one; all are stopped afterwards."""
    from tests.browser import Herald

    made: list[Herald] = []

    def make(store_url: str | None = None, **env: str) -> Herald:
        data = tmp_path / f"herald-{len(made)}"
        data.mkdir()
        server = Herald(data, store_url, env)
        made.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def api(herald: Any, user: str) -> Iterator[Any]:
    """The API (tests/browser.py `Api`) of a new app of the module's `herald`, for `user`."""
    from tests.browser import Api

    made = Api(herald, herald.register(), user)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(autouse=True)
def _no_herald_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads HERALD_* variables; keep a developer's environment out of the tests.
    for key in list(os.environ):
        if key.startswith("HERALD_") and not key.startswith("HERALD_TEST_"):
            monkeypatch.delenv(key)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped: a skip there means a service the suite needs is missing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter:
            reporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips fail CI", red=True)


@pytest.fixture
def redis_service() -> Iterator[RedisServer]:
    """A private redis-server on a free port (tests/redis.py), removed after the test."""
    yield from redis_server()


@pytest.fixture
def postgres_store() -> Iterator[str]:
    """A store URL on a new, empty schema of the test PostgreSQL, dropped after the test."""
    yield from fresh_database()
