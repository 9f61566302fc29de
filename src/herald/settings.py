"""Configuration: one frozen `Settings`, from flags > HERALD_* environment > TOML file > defaults.

Every option has the same name everywhere: `store_url` is `--store-url`, `HERALD_STORE_URL` and
`store_url = "..."` in the file. Unknown file keys and unknown HERALD_* variables are reported, so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from herald.errors import HeraldError

DAY = 86_400
MIB = 1024 * 1024
# A placeholder: Apple's Web Push service refuses it (the server warns at start-up).
DEFAULT_VAPID_SUBJECT = "mailto:herald@localhost"


class ConfigError(HeraldError):
    """The configuration cannot be used; the message says which option and why."""


@dataclass(frozen=True)
class Settings:
    # Where Herald keeps its SQLite database and its issuer signing key.
    data: Path = Path("data")
    # sqlite:///path or postgresql://user:pass@host/db; empty = SQLite file under `data`.
    store_url: str = ""
    # SQLite store (docs/storage.md). The WAL is kept under `sqlite_wal_limit` bytes (0: no
    # bound, PASSIVE checkpoints only); a write waits up to `sqlite_lock_timeout` s for the write
    # lock (another process's, or a checkpoint's while the WAL is at its bound) before a 503;
    # lists and counts run on `sqlite_readers` threads of their own and are stopped after
    # `sqlite_query_timeout` s.
    sqlite_wal_limit: int = 128 * MIB
    sqlite_lock_timeout: float = 10.0
    sqlite_readers: int = 4
    sqlite_query_timeout: float = 5.0
    # PostgreSQL store (docs/operations.md): seconds to open a connection, and seconds a statement
    # may take before its connection is given up (a request then gets 503); both bound how long a
    # request waits while the database is unreachable.
    postgres_connect_timeout: float = 5.0
    postgres_statement_timeout: float = 15.0
    # How changes reach the live streams: "memory" (this process only) or "redis" (every Herald
    # process sharing `redis_url`; the store's change log fills whatever Redis loses).
    broker: str = "memory"
    redis_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    # Worker processes sharing `port` (SO_REUSEPORT; docs/deployment.md). More than 1 needs the
    # PostgreSQL store and the Redis broker. Worker i also listens alone on `worker_port + i`
    # (0: port + 1 + i), for its own /metrics.
    workers: int = 1
    worker_port: int = 0
    # Dispatch shards (docs/deployment.md, "Sharded dispatch"): how long a node's lease on its
    # shards lasts (s, on the database's clock), and how often it renews them. A killed node's
    # shards are taken over within about ttl + interval; renewals that keep failing for the ttl
    # stop the node's dispatch. Give every node sharing a store the same values.
    dispatch_lease_ttl: float = 5.0
    dispatch_renew_interval: float = 1.0
    # Public base URL (for Location, @odata.nextLink and the issuer); empty = http://host:port.
    public_url: str = ""
    log_level: str = "info"
    # "json" for machines, "text" for people.
    log_format: str = "json"
    # Warning and error lines of one kind (logger, message, error) let through per window (s);
    # the rest are counted and reported in one line per window. 0: no limit.
    log_repeats: int = 10
    log_repeat_window: float = 10.0
    # Addresses or networks of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are
    # believed (comma-separated, e.g. "10.0.0.5, 192.168.0.0/24"); empty: none, the connection's
    # own address is the client's.
    trusted_proxies: str = ""
    # Hostile and idle connections (docs/operations.md): the request line and headers, and the
    # URL, at most this many bytes (431, 414); seconds to receive a request's headers (from the
    # connection's opening, or from a later request's first byte), its body (from the end of the
    # headers), and idle between requests; connections per client address that have not sent a
    # complete request head yet.
    max_header_bytes: int = 32_768
    max_url_bytes: int = 16_384
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Longer than the clients' own keep-alive expiry (httpx, the Graph SDK's transport: 5 s;
    # aiohttp 15 s; a load balancer's 60 s), so the client, not Herald, closes an idle connection:
    # a server closing one just as a request goes out on it gets that request a reset.
    idle_timeout: float = 75.0
    max_pending_per_address: int = 64
    # Embedded issuer: Herald mints tokens itself (client credentials endpoint, `herald token`).
    local_issuer: bool = True
    audience: str = "api://herald"
    token_ttl: int = 3600
    # Web inbox sessions (docs/inbox.md): how long a sign-in lasts (refresh tokens end with it).
    session_ttl: int = 14 * DAY
    # The web inbox signs people in at this OIDC issuer (authorization code + PKCE) with this
    # public client id and scope; empty: with the embedded issuer's sign-in links.
    inbox_issuer: str = ""
    inbox_client_id: str = ""
    inbox_scope: str = "openid offline_access"
    # Learn which user a principal name (`/users/alice@contoso.com`) names from delegated tokens'
    # `upn`/`preferred_username` claims; off: only from `herald user set` (docs/auth.md).
    learn_user_names: bool = True
    # Further origins the inbox may connect to, space-separated: an IdP whose token endpoint is
    # not on its issuer's origin (the page's Content-Security-Policy allows only those).
    inbox_origins: str = ""
    # Origins whose web pages may call the API from the browser (CORS), comma-separated; "*" for
    # any (safe with bearer tokens: browsers send none by themselves); empty for none.
    cors_origins: str = "*"
    # External issuers as a JSON list (env) or TOML array of tables:
    # [{issuer, audience, jwks_url | discovery_url}]
    issuers: tuple[Mapping[str, str], ...] = ()
    # Notification limits. 4096 bytes of payload fits every platform's push limit once wrapped.
    max_payload_bytes: int = 4096
    max_body_bytes: int = 65_536
    default_ttl: int = 7 * DAY
    max_ttl: int = 30 * DAY
    # "reject" answers 400 for an expirationDateTime beyond max_ttl; "clamp" shortens it.
    ttl_policy: str = "reject"
    default_page_size: int = 100
    max_page_size: int = 999
    # Expiry sweeper period (s) and how long the change log (delta history) is kept.
    sweep_interval: float = 30.0
    # Seconds between releases of pushes held for quiet hours (one per interval across the
    # processes sharing a store): a summary arrives at most this long after a quiet period ends.
    quiet_release_interval: float = 15.0
    change_retention: int = 30 * DAY
    idempotency_ttl: int = DAY
    # Sends to many users (docs/api.md "Audiences"): user ids per request (a send's list, or
    # members added or removed at once), members per audience, audiences per app, and how many
    # recipients the background runner writes per batch (one group-committed transaction).
    send_max_recipients: int = 10_000
    audience_max_members: int = 1_000_000
    max_audiences: int = 1_000
    send_batch: int = 50
    # A finished send's operation (its status, counts, failures, Idempotency-Key) is kept this
    # long, then the sweeper removes it (s).
    operation_retention: int = 7 * DAY
    # Seconds the runner waits between batches (0: it only yields to the event loop).
    send_pause: float = 0.0
    # Rate limits (token buckets): requests per second and burst, per app and per (app, user).
    app_rate: float = 2000.0
    app_burst: int = 4000
    user_rate: float = 20.0
    user_burst: int = 200
    # Client-credentials token requests per second and burst, per client address.
    token_rate: float = 5.0
    token_burst: int = 20
    # Device subscriptions: default and longest lifetime (s, renewable by PATCH), and how many
    # unexpired ones one user may hold per app.
    subscription_ttl: int = 30 * DAY
    max_subscription_ttl: int = 90 * DAY
    max_subscriptions: int = 50
    # Live streams (WebSocket, SSE): seconds between keep-alives when nothing else is sent, and
    # how many may be open at once per subscription (one per browser tab) and per user and app.
    keepalive_interval: float = 25.0
    max_streams_per_subscription: int = 20
    max_streams_per_user: int = 100
    # Push channels (docs/push.md). Off: nothing is queued for push channels.
    push_enabled: bool = True
    # Extra CA certificates (PEM file) trusted for push services, e.g. a private relay.
    push_ca_file: str = ""
    # VAPID `sub` claim (mailto: or https: URL); empty = public_url if https, else a mailto.
    push_vapid_subject: str = ""
    push_apns_production_url: str = "https://api.push.apple.com"
    push_apns_development_url: str = "https://api.sandbox.push.apple.com"
    push_fcm_url: str = "https://fcm.googleapis.com"
    push_wns_token_url: str = "https://login.live.com/accesstoken.srf"
    # Hosts a WNS channel URI may name (comma-separated; "*." matches subdomains): WNS access
    # tokens are sent to channel URIs, so only to these.
    push_wns_hosts: str = "*.notify.windows.com"
    # Web Push endpoints on loopback or private networks are refused (Herald would otherwise
    # POST wherever a device points it); allow them for a relay on the LAN, or a test.
    push_allow_private_endpoints: bool = False
    # Seconds per push request; requests in flight per provider; attempts per push; retry
    # backoff base and cap (s); how long a claimed push is leased to a node (s).
    push_timeout: float = 10.0
    push_concurrency: int = 64
    push_max_attempts: int = 10
    push_backoff_base: float = 2.0
    push_backoff_max: float = 3600.0
    push_lease: float = 60.0
    # Webhooks (docs/api.md "Change feed"): seconds per POST; the first retry's delay and the
    # cap of the doubling delays (s); how long delivery may keep failing before the webhook is
    # marked failed (s; less than change_retention, which prunes what it would deliver);
    # changes per POST; how often each process looks for due webhooks besides the wake-ups its
    # own writes give (s); webhooks per app.
    webhook_timeout: float = 10.0
    webhook_backoff_base: float = 5.0
    webhook_backoff_max: float = 3600.0
    webhook_give_up: float = 3.0 * DAY
    webhook_batch: int = 100
    webhook_poll_interval: float = 1.0
    max_webhooks: int = 10
    # Webhook URLs on loopback or private networks are refused, at registration and at connect
    # time (as push endpoints are); allow them for a receiver on the LAN, or a test.
    webhook_allow_private_endpoints: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data / 'herald.db').resolve()}"

    @property
    def issuer_url(self) -> str:
        # Stable across processes: `herald token` and `herald serve --port N` must agree on it.
        return self.public_url.rstrip("/") or "urn:herald:local"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def first_worker_port(self) -> int:
        return self.worker_port or self.port + 1

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]

    @property
    def vapid_subject(self) -> str:
        if self.push_vapid_subject:
            return self.push_vapid_subject
        if self.public_url.startswith("https://"):
            return self.public_url.rstrip("/")
        return DEFAULT_VAPID_SUBJECT


FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "extra"}
ENV_PREFIX = "HERALD_"
# Variables that configure the CLI itself, not the server.
CLI_ENV = {"HERALD_CONFIG", "HERALD_URL", "HERALD_TOKEN"}


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    unknown: tuple[str, ...]


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> Loaded:
    """Merge the sources; raise ConfigError for values that cannot be used."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    unknown: list[str] = []
    path = file or (Path(env["HERALD_CONFIG"]) if env.get("HERALD_CONFIG") else None)
    if path is not None:
        values.update(_from_file(path, unknown))
    values.update(_from_env(env, unknown))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    settings = Settings(**{k: _cast(k, v) for k, v in values.items()})
    _check(settings)
    return Loaded(settings, tuple(unknown))


def _from_file(path: Path, unknown: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in FIELDS:
            out[name] = value
        else:
            unknown.append(f"{path}: unknown key {key!r}")
    return out


def _from_env(env: Mapping[str, str], unknown: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in CLI_ENV or key.startswith("HERALD_TEST_"):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in FIELDS:
            out[name] = value
        else:
            unknown.append(f"environment: unknown variable {key}")
    return out


def _cast(name: str, value: Any) -> Any:
    if name not in FIELDS:
        raise ConfigError(f"unknown option {name!r}")
    kind = type(getattr(Settings(), name))
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
            return value.lower() in {"1", "true", "yes", "on"}
        if kind is tuple:
            items = json.loads(value) if isinstance(value, str) else value
            return tuple(dict(i) for i in items)
        if kind is Path:
            return Path(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"option {name}: cannot use {value!r} ({exc})") from exc


def _check(s: Settings) -> None:
    problems = []
    if s.log_format not in {"json", "text"}:
        problems.append("log_format must be 'json' or 'text'")
    if s.ttl_policy not in {"reject", "clamp"}:
        problems.append("ttl_policy must be 'reject' or 'clamp'")
    if not 0 < s.default_ttl <= s.max_ttl:
        problems.append("default_ttl must be > 0 and <= max_ttl")
    for name in ("app_rate", "user_rate", "token_rate", "app_burst", "user_burst", "token_burst"):
        if getattr(s, name) <= 0:
            problems.append(f"{name} must be > 0")
    if not 0 < s.subscription_ttl <= s.max_subscription_ttl:
        problems.append("subscription_ttl must be > 0 and <= max_subscription_ttl")
    for name in (
        "token_ttl",
        "session_ttl",
        "max_payload_bytes",
        "max_body_bytes",
        "sweep_interval",
        "quiet_release_interval",
        "max_subscriptions",
        "keepalive_interval",
        "max_streams_per_subscription",
        "max_streams_per_user",
        "max_header_bytes",
        "max_url_bytes",
        "header_timeout",
        "body_timeout",
        "idle_timeout",
        "max_pending_per_address",
        "log_repeat_window",
        "push_timeout",
        "push_concurrency",
        "push_max_attempts",
        "push_backoff_base",
        "push_backoff_max",
        "webhook_timeout",
        "webhook_backoff_base",
        "webhook_backoff_max",
        "webhook_give_up",
        "webhook_batch",
        "webhook_poll_interval",
        "max_webhooks",
        "send_max_recipients",
        "audience_max_members",
        "max_audiences",
        "send_batch",
        "operation_retention",
    ):
        if getattr(s, name) <= 0:
            problems.append(f"{name} must be > 0")
    if s.webhook_backoff_base > s.webhook_backoff_max:
        problems.append("webhook_backoff_base must be <= webhook_backoff_max")
    if s.webhook_give_up >= s.change_retention:
        problems.append("webhook_give_up must be < change_retention")
    if s.webhook_batch > 1000:
        problems.append("webhook_batch must be <= 1000")
    if s.send_pause < 0:
        problems.append("send_pause must be >= 0")
    if s.log_repeats < 0:
        problems.append("log_repeats must be >= 0")
    if s.max_url_bytes > s.max_header_bytes:
        problems.append("max_url_bytes must be <= max_header_bytes (the URL is part of the head)")
    if s.max_streams_per_subscription > s.max_streams_per_user:
        problems.append("max_streams_per_subscription must be <= max_streams_per_user")
    for proxy in s.trusted_proxy_list:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(f"trusted_proxies: {proxy!r} is not an IP address or network")
    if s.sqlite_wal_limit and s.sqlite_wal_limit < MIB:
        problems.append("sqlite_wal_limit must be 0 (no bound) or at least 1048576 bytes")
    for name in (
        "sqlite_lock_timeout",
        "sqlite_readers",
        "sqlite_query_timeout",
        "postgres_connect_timeout",
        "postgres_statement_timeout",
    ):
        if getattr(s, name) <= 0:
            problems.append(f"{name} must be > 0")
    problems += _check_dispatch_lease(s)
    if s.push_lease <= s.push_timeout:
        problems.append("push_lease must be longer than push_timeout")
    if s.push_ca_file and not Path(s.push_ca_file).is_file():
        problems.append(f"push_ca_file {s.push_ca_file!r} is not a file")
    if s.push_vapid_subject and not s.push_vapid_subject.startswith(("mailto:", "https://")):
        problems.append("push_vapid_subject must be a mailto: or https: URL")
    if not 0 < s.default_page_size <= s.max_page_size:
        problems.append("default_page_size must be > 0 and <= max_page_size")
    if s.store_url and not s.store_url.startswith(("sqlite:", "postgresql:", "postgres:")):
        problems.append("store_url must start with sqlite: or postgresql:")
    if s.broker not in {"memory", "redis"}:
        problems.append("broker must be 'memory' or 'redis'")
    elif s.broker == "redis" and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(
            "broker 'redis' needs redis_url (redis://host:port/db, rediss:// or unix://)"
        )
    elif s.broker == "redis" and not _importable("redis.asyncio"):
        problems.append("broker 'redis' needs the redis extra: pip install 'herald[redis]'")
    elif s.broker == "memory" and s.redis_url:
        problems.append("redis_url is set but broker is 'memory': set broker = 'redis' to use it")
    problems += _check_workers(s)
    for issuer in s.issuers:
        known = {"issuer", "audience", "jwks_url", "discovery_url"}
        if not {"issuer", "audience"} <= issuer.keys() or not (
            {"jwks_url", "discovery_url"} & issuer.keys()
        ):
            problems.append(
                "each issuers entry needs 'issuer', 'audience' and 'jwks_url' or 'discovery_url'"
            )
        elif issuer.keys() - known:
            problems.append(f"issuers entry has unknown keys {sorted(issuer.keys() - known)}")
    if s.inbox_issuer and not (
        s.inbox_issuer.startswith(("https://", "http://")) and s.inbox_client_id
    ):
        problems.append("inbox_issuer must be an http(s) URL, and needs inbox_client_id")
    for origin in s.inbox_origins.split():
        parts = urlsplit(origin)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.path or parts.query:
            problems.append(f"inbox_origins: {origin!r} is not an origin (scheme://host[:port])")
    if not s.local_issuer and not s.issuers:
        problems.append("no token issuer: enable local_issuer or configure issuers")
    if problems:
        raise ConfigError("; ".join(problems))


def _check_dispatch_lease(s: Settings) -> list[str]:
    # Three renewals per ttl at least: one slow or failed renewal must not let the leases lapse.
    if not 0 < s.dispatch_renew_interval <= s.dispatch_lease_ttl / 3:
        return ["dispatch_renew_interval must be > 0 and <= dispatch_lease_ttl / 3"]
    return []


def _check_workers(s: Settings) -> list[str]:
    if s.workers < 1:
        return ["workers must be >= 1"]
    if s.workers == 1:
        return []
    problems = []
    if not s.resolved_store_url.startswith(("postgresql:", "postgres:")):
        problems.append(
            "workers > 1 needs the PostgreSQL store (store_url = 'postgresql://...'):"
            " a SQLite database is written by one process"
        )
    if s.broker != "redis":
        problems.append(
            "workers > 1 needs broker = 'redis' (and redis_url): with the memory broker a"
            " worker's streams would not see changes made through the other workers"
        )
    first, last = s.first_worker_port, s.first_worker_port + s.workers - 1
    if first <= s.port <= last or last > 65_535 or s.worker_port < 0:
        problems.append(
            f"worker ports {first}-{last} (worker_port + index) must be valid and exclude port"
        )
    return problems


def _importable(module: str) -> bool:
    """Whether an optional dependency can be imported (found is not enough: it may be broken)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
