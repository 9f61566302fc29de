"""Web Push benchmark: pushes per second through Herald's whole push path, against the raw rate of
the encryption library doing the per-message work Herald does, measured in the same run.

    baseline  http_ece.encrypt(aes128gcm) as Herald called it until issue 15 (fresh P-256 key, salt
              per message, a real subscriber's p256dh/auth, a ~360-byte JSON message), in a loop
              in this process, single-threaded, for --duration s; measured before and after the
              Herald run and averaged. Informational: the same plus a cached VAPID header and the
              request headers (what Herald adds per message), ECDH key generation alone, an
              uncached VAPID signature, and decryption (the stand-in's cost per message).
    herald    `herald serve` (SQLite, or --store postgres) pushing to the Web Push stand-in
              (`python -m tests.standins webpush`, its own process: HTTPS, checks every request's
              VAPID JWT and headers, decrypts every message and records it).

Herald is driven as a deployment: an app registered with `herald app create`, its VAPID key from
`herald app push-key` (checked against GET /beta/webPushKey), one browser-style subscription per
device made by the stand-in and registered with Herald over HTTP (POST
/beta/me/notificationSubscriptions, a delegated token of its user), HERALD_PUSH_CA_FILE set to the
stand-in's CA. This process, as the app server, posts --notifications notifications (app-only
token, POST /beta/users/{id}/notifications) as fast as ingest answers (or at --rate), and reads the
stand-in's record afterwards: pushes accepted per second, latency from the POST's 201 to the
stand-in accepting the push (both read time.time() on this machine), missing and duplicate pushes.

--preload holds the stand-in's first push_concurrency requests for --hold s (the control API's
`delay`), so every notification is posted and its pushes queued in the store before any push
completes; the drain rate then is the push engine alone, without ingest beside it.

Usage: .venv/bin/python benchmarks/push.py [--users 1000] [--devices 1] [--notifications 10000]
       [--store sqlite|postgres] [--preload] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import http_ece
import ingest  # shared helpers: processes, ports, /proc CPU, app registration, PostgreSQL
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from ingest import HOST, HOST_NAME
from py_vapid import Vapid02

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # tests.standins: the protocol-verifying push service stand-ins

from tests.standins.control import ControlClient  # noqa: E402
from tests.standins.process import Spawned, spawn  # noqa: E402

TOKEN_TTL = 3 * 3600
WARMUP_USER = "push-warmup"
WARMUP_POSTS = 20
SAMPLE_S = 0.2  # CPU/RSS sampler period
POLL_S = 0.25  # stand-in stats while waiting for the pushes
NOISY_OTHER_PCT = 15.0
EXTRA_ENV = {"HERALD_TOKEN_RATE": "1000000000", "HERALD_TOKEN_BURST": "1000000000"}
TITLE = "Your order shipped"
PUSH_ATTEMPTS = "herald_push_attempts_total"
PUSH_SECONDS = "herald_push_seconds"


def log(msg: str) -> None:
    print(f"push: {msg}", file=sys.stderr, flush=True)


def user_name(u: int) -> str:
    return WARMUP_USER if u < 0 else f"push-user-{u:05d}"


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(p / 100 * len(sorted_xs)))]


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KB: now and the peak since the process started."""
    rss = hwm = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """user + system CPU of one thread of a process."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ingest.CLK_TCK


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def notification_body(seq: int) -> bytes:
    """What the app server posts; Herald's push message for it is ~360 bytes of JSON."""
    return json.dumps(
        {
            "targetHostName": HOST_NAME,
            "appNotificationId": f"order-{seq}",
            "groupName": "orders",
            "payload": {
                "rawContent": json.dumps({"order": seq}),
                "visualContent": {"title": TITLE, "body": f"Order {seq} arrives on Thursday."},
            },
            "priority": "High",
            "displayTimeToLive": "60",
        }
    ).encode()


# -- baseline: the library's own rate -------------------------------------------------------------


def sample_message(seq: int = 1717) -> bytes:
    """Herald's push message (docs/push.md, "The message") for notification_body(seq),
    with the same fields and sizes (msgspec's compact JSON, as Herald encodes it)."""
    doc = {
        "type": "alert",
        "position": 123456,
        "id": str(uuid.UUID(int=0x0190F1C47D2E7C3A9A553F1E2D4C5B6A)),
        "appNotificationId": f"order-{seq}",
        "groupName": "orders",
        "title": TITLE,
        "body": f"Order {seq} arrives on Thursday.",
        "rawContent": json.dumps({"order": seq}),
        "priority": "High",
        "readState": "unread",
        "userActionState": "none",
        "displayTimeToLive": 60,
        "expirationDateTime": "2026-12-04T10:00:00Z",
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Rate:
    name: str
    per_s: float
    cpu_us: float  # CPU time per operation (this process)
    count: int
    note: str = ""


def measure_rate(name: str, fn: Callable[[], object], seconds: float, note: str = "") -> Rate:
    for _ in range(50):  # warm: first-use costs (imports, OpenSSL tables)
        fn()
    count, cpu0, t0 = 0, ingest.own_cpu(), time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(64):
            fn()
        count += 64
        if time.perf_counter() >= deadline:
            break
    wall, cpu = time.perf_counter() - t0, ingest.own_cpu() - cpu0
    return Rate(name, count / wall, 1e6 * cpu / count, count, note)


class Baseline:
    """The work Herald's Web Push channel does per message, with the libraries it uses."""

    def __init__(self) -> None:
        # A subscriber as a browser makes one: a P-256 key pair and a 16-byte auth secret.
        self.subscriber = ec.generate_private_key(ec.SECP256R1())
        self.p256dh = b64url(
            self.subscriber.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )
        self.auth = b64url(os.urandom(16))
        self.body = sample_message()
        self.vapid = Vapid02()
        self.vapid.generate_keys()
        self.audience = "https://127.0.0.1:443"
        self.tokens: dict[tuple[str, str], tuple[float, str]] = {}
        self.sealed = self.encrypt()

    @staticmethod
    def _b64(value: str) -> bytes:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))

    def encrypt(self) -> bytes:
        """As outbound/providers/webpush.encrypt did before issue 15 (the reference the ratios
        are to): fresh ECDH key and salt, keys decoded per call."""
        return bytes(
            http_ece.encrypt(
                self.body,
                salt=os.urandom(16),
                private_key=ec.generate_private_key(ec.SECP256R1()),
                dh=self._b64(self.p256dh),
                auth_secret=self._b64(self.auth),
                version="aes128gcm",
            )
        )

    def sign(self) -> str:
        claims = {
            "aud": self.audience,
            "exp": int(time.time()) + 12 * 3600,
            "sub": "mailto:herald@localhost",
        }
        return str(self.vapid.sign(claims)["Authorization"])

    def authorization(self) -> str:
        """Herald's cache: one VAPID JWT per (app, audience), renewed at half-life."""
        now = time.time()
        cached = self.tokens.get((HOST_NAME, self.audience))
        if cached is not None and cached[0] > now:
            return cached[1]
        header = self.sign()
        self.tokens[(HOST_NAME, self.audience)] = (now + 6 * 3600, header)
        return header

    def request(self) -> tuple[dict[str, str], bytes]:
        """Encryption plus the headers Herald sends with it (cached VAPID, Topic digest)."""
        digest = hashlib.sha256(b"0190f1c4-7d2e-7c3a-9a55-3f1e2d4c5b6a").digest()
        headers = {
            "TTL": "86400",
            "Urgency": "high",
            "Topic": base64.urlsafe_b64encode(digest).decode()[:32],
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self.authorization(),
        }
        return headers, self.encrypt()

    def decrypt(self) -> bytes:
        return bytes(
            http_ece.decrypt(
                self.sealed,
                private_key=self.subscriber,
                auth_secret=self._b64(self.auth),
                version="aes128gcm",
            )
        )

    def main(self, seconds: float) -> Rate:
        return measure_rate("encrypt", self.encrypt, seconds)

    def extras(self, seconds: float) -> list[Rate]:
        return [
            measure_rate(
                "encrypt + headers",
                self.request,
                seconds,
                "+ cached VAPID header, Topic digest, header dict",
            ),
            measure_rate(
                "ECDH keygen",
                lambda: ec.generate_private_key(ec.SECP256R1()),
                seconds,
                "one of the two P-256 operations in each encryption",
            ),
            measure_rate("VAPID sign", self.sign, seconds, "uncached: what the cache saves"),
            measure_rate("decrypt", self.decrypt, seconds, "the stand-in's crypto per message"),
        ]


# -- the stand-in and Herald -----------------------------------------------------------------------


class Sampler(threading.Thread):
    """CPU time of the processes under test, this process and the whole machine, and Herald's
    RSS, every SAMPLE_S (wall clock, so windows line up with the stand-in's timestamps)."""

    def __init__(self, pids: dict[str, int], with_postgres: bool) -> None:
        super().__init__(daemon=True, name="push-sampler")
        self.pids = pids
        self.with_postgres = with_postgres
        self.samples: list[dict[str, float]] = []
        self.stopping = threading.Event()

    def sample(self) -> dict[str, float]:
        row: dict[str, float] = {"t": time.time()}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                row[name] = ingest.proc_cpu_seconds(pid)
        with contextlib.suppress(OSError):  # the event loop's own thread (tid = pid)
            row["herald_loop"] = thread_cpu_seconds(self.pids["herald"], self.pids["herald"])
        row["harness"] = ingest.own_cpu()
        row["busy"] = ingest.system_busy_seconds()
        if self.with_postgres:
            row["postgres"] = ingest.postgres_cpu_seconds()
        row["herald_rss_kb"] = rss_kb(self.pids["herald"])[0]
        return row

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            self.samples.append(self.sample())

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.samples.append(self.sample())

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """CPU in % of one core between the samples around [t0, t1]; Herald's peak RSS."""
        rows = self.samples
        if len(rows) < 2 or t1 <= t0:
            return {}
        a = max((r for r in rows if r["t"] <= t0), key=lambda r: r["t"], default=rows[0])
        b = min((r for r in rows if r["t"] >= t1), key=lambda r: r["t"], default=rows[-1])
        wall = b["t"] - a["t"]
        if wall <= 0:
            return {}
        out = {"wall_s": wall}
        ours = 0.0
        for name in (*self.pids, "harness", "postgres"):
            if name in a and name in b:
                used = b[name] - a[name]
                ours += used
                out[f"{name}_pct"] = 100 * used / wall
        if "herald_loop" in a and "herald_loop" in b:  # part of Herald's figure
            out["herald_loop_pct"] = 100 * (b["herald_loop"] - a["herald_loop"]) / wall
        out["other_pct"] = max(0.0, 100 * ((b["busy"] - a["busy"]) - ours) / wall)
        inside = [r["herald_rss_kb"] for r in rows if a["t"] <= r["t"] <= b["t"]]
        out["herald_rss_peak_kb"] = max(inside, default=0)
        out["herald_cpu_s"] = b.get("herald", 0.0) - a.get("herald", 0.0)
        return out


@dataclass
class Posts:
    users: list[int]
    sent: list[float]  # time.time() just before the POST was handed to the client
    acked: list[float]  # … when its response was read
    status: list[int]  # 0 = no response
    ids: list[str | None]  # the notification id from the 201
    errors: Counter[str] = field(default_factory=Counter)


async def post_all(base: str, token: str, users: list[int], connections: int, rate: float) -> Posts:
    """POST every notification; closed loop over `connections` connections (as fast as ingest
    answers), or open loop at `rate` posts/s (POST n due at start + n/rate)."""
    count = len(users)
    posts = Posts(users, [0.0] * count, [0.0] * count, [0] * count, [None] * count)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    bodies = [notification_body(seq) for seq in range(count)]
    urls = [f"{base}/beta/users/{user_name(u)}/notifications" for u in users]

    async def one(session: aiohttp.ClientSession, seq: int) -> None:
        posts.sent[seq] = time.time()
        try:
            async with session.post(urls[seq], data=bodies[seq], headers=headers) as resp:
                text = await resp.read()
                posts.acked[seq] = time.time()
                posts.status[seq] = resp.status
                if resp.status == 201:
                    posts.ids[seq] = json.loads(text)["id"]
                else:
                    posts.errors[f"{resp.status}: {text[:200].decode(errors='replace')}"] += 1
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            posts.acked[seq] = time.time()
            posts.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if rate > 0:
            start = time.monotonic() + 0.05
            tasks = []
            for seq in range(count):
                delay = start + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(session, seq)))
            await asyncio.gather(*tasks)
        else:
            pending = iter(range(count))

            async def worker() -> None:
                for seq in pending:
                    await one(session, seq)

            await asyncio.gather(*(worker() for _ in range(connections)))
    return posts


async def register(
    base: str, tokens: dict[int, str], channels: dict[int, list[dict[str, Any]]]
) -> dict[str, int]:
    """Register every device's Web Push channel with Herald as its user: {target: user}."""
    owner: dict[str, int] = {}
    gate = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, user: int, channel: dict[str, Any]) -> None:
        body = {"application": HOST_NAME, "platform": "webPush", "pushChannel": channel}
        headers = {"Authorization": f"Bearer {tokens[user]}"}
        url = f"{base}/beta/me/notificationSubscriptions"
        async with gate, session.post(url, json=body, headers=headers) as resp:
            text = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"POST {url} answered {resp.status}: {text[:300]}")
        owner[channel["endpoint"].rsplit("/push/", 1)[1]] = user

    async with aiohttp.ClientSession() as session:
        first_user = next(iter(channels))
        await one(session, first_user, channels[first_user][0])  # fail fast
        await asyncio.gather(
            *(
                one(session, u, ch)
                for u, chs in channels.items()
                for i, ch in enumerate(chs)
                if (u, i) != (first_user, 0)
            )
        )
    return owner


def mint_tokens(data: Path, port: int, client_id: str, users: int) -> tuple[str, dict[int, str]]:
    """The app-only token and one delegated token per user, from the server's own issuer key."""
    from herald.auth.issuer import LocalIssuer
    from herald.settings import load

    settings = load({"data": str(data), "port": port}, env=ingest.server_env()).settings
    issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    app = issuer.mint(client_id=client_id, user_id=None, ttl_seconds=TOKEN_TTL)
    names = {u: user_name(u) for u in (-1, *range(users))}
    tokens = {
        u: issuer.mint(client_id=client_id, user_id=name, ttl_seconds=TOKEN_TTL)
        for u, name in names.items()
    }
    return app, tokens


def push_key(data: Path, store_url: str | None, env: dict[str, str]) -> str:
    argv = [ingest.herald_bin(), "app", "push-key", HOST_NAME, "--data", str(data)]
    if store_url:
        argv += ["--store", store_url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"herald app push-key failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


async def get_json(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}: {text[:300]}")
        return json.loads(text) if "json" in resp.content_type else text


def push_metrics(base: str) -> tuple[dict[str, int], float]:
    """Herald's own view (its Prometheus metrics): Web Push attempts by outcome, and the mean
    time of one push request (`herald_push_seconds`: rendering, encryption, the answer)."""
    text = asyncio.run(get_json(f"{base}/metrics"))
    attempts: dict[str, int] = {}
    seconds = {"sum": 0.0, "count": 0.0}
    for line in str(text).splitlines():
        if 'provider="webpush"' not in line.lower():
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(PUSH_ATTEMPTS):
            attempts[line.split('outcome="', 1)[1].split('"', 1)[0]] = int(value)
        for part in seconds:
            if line.startswith(f"{PUSH_SECONDS}_{part}"):
                seconds[part] = value
    return attempts, (1e3 * seconds["sum"] / seconds["count"] if seconds["count"] else 0.0)


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Result:
    store: str
    users: int
    devices: int
    subscriptions: int = 0
    notifications: int = 0
    preload: bool = False
    push_concurrency: int = 0
    posts_acked: int = 0
    post_errors: dict[str, int] = field(default_factory=dict)
    post_s: float = 0.0  # first POST sent to last POST answered
    post_rate: float = 0.0
    post_p50_ms: float = 0.0
    post_p99_ms: float = 0.0
    expected: int = 0  # pushes: acknowledged notifications x their user's devices
    received: int = 0  # distinct expected (notification, subscription) pairs accepted
    missing: int = 0
    duplicates: int = 0
    misrouted: int = 0  # a push for a notification at a subscription of another user
    unexpected: int = 0  # a push for a notification this run did not get a 201 for
    refused: int = 0  # requests the stand-in refused (verification failed)
    refusals: dict[str, int] = field(default_factory=dict)
    accepted_while_posting: int = 0
    push_s: float = 0.0  # overall: first POST sent to last push accepted
    push_rate: float = 0.0
    steady_rate: float = 0.0  # middle 80 % of the accepted pushes
    drain_s: float = 0.0  # --preload: from the K-th accepted push to the last
    drain_rate: float = 0.0
    drain_steady_rate: float = 0.0
    latency_p50_ms: float = float("nan")  # POST answered 201 -> stand-in accepted the push
    latency_p99_ms: float = float("nan")
    latency_max_ms: float = float("nan")
    latency_sent_p50_ms: float = float("nan")  # POST sent -> accepted
    latency_sent_p99_ms: float = float("nan")
    message_bytes: float = 0.0  # Herald's plaintext push message (mean)
    encrypted_bytes: float = 0.0
    sample_message: dict[str, Any] = field(default_factory=dict)  # one, as decrypted
    herald_attempts: dict[str, int] = field(default_factory=dict)
    herald_push_ms: float = 0.0  # Herald's mean time per push request (its metrics)
    cpu: dict[str, float] = field(default_factory=dict)  # the push window (see README)
    cpu_post: dict[str, float] = field(default_factory=dict)  # --preload: posting only
    herald_rss_before_kb: int = 0  # when posting started
    herald_rss_end_kb: int = 0
    herald_rss_hwm_kb: int = 0  # VmHWM at the end (peak over the whole life, setup included)
    herald_us_per_push: float = 0.0  # Herald CPU in the push window / pushes
    standin_us_per_push: float = 0.0
    server_log: str = ""
    profile: str = ""  # --py-spy: Herald's hottest frames
    error: str | None = None


def run_herald(args: argparse.Namespace, procs: ingest.Processes, work: Path) -> Result:
    result = Result(args.store, args.users, args.devices, preload=args.preload)
    result.push_concurrency = args.push_concurrency
    data = work / "herald"
    data.mkdir()
    log_path = work / "herald.log"
    standin: Spawned | None = None
    proc = None
    pg_admin, schema = None, f"push_{uuid.uuid4().hex[:12]}"
    try:
        log("starting the Web Push stand-in")
        standin = spawn("webpush", work / "standin", args=("--keep", "0"))
        env = ingest.server_env(
            {
                **EXTRA_ENV,
                "HERALD_PUSH_CA_FILE": str(standin.ca_file),
                "HERALD_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",  # the stand-in is on loopback
                "HERALD_PUSH_VAPID_SUBJECT": "mailto:bench@example.com",
                "HERALD_PUSH_CONCURRENCY": str(args.push_concurrency),
                **(
                    {  # the held requests must not time out in Herald (and a lease outlasts it)
                        "HERALD_PUSH_TIMEOUT": str(args.hold + 20),
                        "HERALD_PUSH_LEASE": str(args.hold + 80),
                    }
                    if args.preload
                    else {}
                ),
            }
        )
        for name in [k for k in env if k.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
            del env[name]  # loopback only
        store_url = None
        if args.store == "postgres":
            pg_admin = ingest.postgres_url(args)
            ingest.pg(pg_admin, f"CREATE SCHEMA {schema}")
            store_url = ingest.with_search_path(pg_admin, schema)
        client_id = ingest.register_app(data, store_url, env)
        vapid_key = push_key(data, store_url, env)
        port = ingest.free_port()
        app_token, tokens = mint_tokens(data, port, client_id, args.users)
        argv = [ingest.herald_bin(), "serve", "--data", str(data), "--host", HOST]
        argv += ["--port", str(port)]
        if store_url:
            argv += ["--store", store_url]
        proc = procs.start(argv, env, log_path)
        ingest.wait_ready(proc, port, "/healthz", log_path)
        base = f"http://{HOST}:{port}"
        served = asyncio.run(get_json(f"{base}/beta/webPushKey", app_token))
        if served.get("applicationServerKey") != vapid_key:
            raise RuntimeError(f"GET /beta/webPushKey gave {served}, push-key gave {vapid_key}")
        with standin.control() as ctl:
            measure(args, ctl, base, proc.pid, standin, app_token, tokens, vapid_key, result)
        if args.py_spy:
            result.profile = summarise_profile(work / "herald-py-spy.txt")
        if proc.poll() is not None:
            raise RuntimeError(f"herald exited during the run:\n{ingest.tail(log_path)}")
    except Exception as exc:  # reported with the table
        result.error = failure(exc)
    finally:
        if proc is not None:
            procs.stop(proc)
            result.server_log = problems(log_path)
        if standin is not None:
            standin.stop()
        if pg_admin is not None:
            with contextlib.suppress(Exception):
                ingest.pg(pg_admin, f"DROP SCHEMA {schema} CASCADE")
    return result


def measure(
    args: argparse.Namespace,
    ctl: ControlClient,
    base: str,
    herald_pid: int,
    standin: Spawned,
    app_token: str,
    tokens: dict[int, str],
    vapid_key: str,
    result: Result,
) -> None:
    subscriptions = args.users * args.devices
    log(f"creating {subscriptions:,} Web Push subscriptions (stand-in, then Herald)")
    made = ctl.create(subscriptions + 1, applicationServerKey=vapid_key)
    channels: dict[int, list[dict[str, Any]]] = {-1: [made[-1]]}
    for i, sub in enumerate(made[:-1]):
        channels.setdefault(i // args.devices, []).append(sub)
    owner = asyncio.run(register(base, tokens, channels))
    result.subscriptions = len(owner) - 1
    targets_of: dict[int, list[str]] = {}
    for target, user in owner.items():
        targets_of.setdefault(user, []).append(target)

    log(f"warm-up: {WARMUP_POSTS} notifications to one subscription")
    warm = asyncio.run(post_all(base, app_token, [-1] * WARMUP_POSTS, 4, 0.0))
    if warm.errors:
        raise RuntimeError(f"warm-up POSTs failed: {dict(warm.errors)}")
    try:
        ctl.wait_accepted(WARMUP_POSTS, timeout=30)
    except TimeoutError as exc:
        raise RuntimeError(f"warm-up: the stand-in did not get the pushes: {exc}") from exc
    ctl.reset()  # the record starts empty; subscribers stay

    pids = {"herald": herald_pid, "standin": standin.process.pid}
    wait_quiet(args.wait_quiet, list(pids.values()))
    sampler = Sampler(pids, args.store == "postgres")
    sampler.start()
    # With --preload, the drain alone (ingest excluded): from the last 201 on.
    profiler = None if args.preload else start_py_spy(args, herald_pid)
    try:
        hold_until = 0.0
        if args.preload:
            ctl.delay(args.hold, count=args.push_concurrency)
            hold_until = time.time() + args.hold
        result.herald_rss_before_kb = rss_kb(herald_pid)[0]
        users = [seq % args.users for seq in range(args.notifications)]
        log(
            f"posting {args.notifications:,} notifications "
            + (f"at {args.rate:g}/s" if args.rate > 0 else f"over {args.connections} connections")
        )
        posts = asyncio.run(post_all(base, app_token, users, args.connections, args.rate))
        if args.preload:
            profiler = start_py_spy(args, herald_pid)
        result.accepted_while_posting = int(ctl.stats()["accepted"])
        summarise_posts(result, posts)
        if args.preload and time.time() >= hold_until:
            log(
                f"warning: posting took longer than --hold {args.hold:g} s; "
                "the drain overlapped with ingest"
            )
        result.expected = sum(
            len(targets_of[u]) for u, i in zip(posts.users, posts.ids, strict=True) if i
        )
        log(f"waiting for {result.expected:,} pushes")
        wait_pushes(ctl, result.expected, args.drain, hold_until)
    finally:
        stop_py_spy(profiler)
        sampler.stop()
    records = ctl.accepted()
    stats = ctl.stats()
    refused = ctl.refused()
    result.refused = int(stats.get("refused", 0))
    result.refusals = dict(Counter(f"{r['status']} {r['reason']}" for r in refused))
    result.herald_attempts, result.herald_push_ms = push_metrics(base)
    result.herald_rss_end_kb, result.herald_rss_hwm_kb = rss_kb(herald_pid)
    tally(args, result, posts, records, targets_of, sampler)


def wait_quiet(max_s: float, pids: list[int]) -> None:
    """Wait (up to max_s) until the rest of the machine is quiet (`ingest.wait_quiet`); our
    own CPU is this process plus `pids`."""
    if max_s <= 0:
        return
    log(f"waiting up to {max_s:g} s for the machine to be quiet")

    def ours() -> float:
        total = ingest.own_cpu()
        for pid in pids:
            with contextlib.suppress(OSError):
                total += ingest.proc_cpu_seconds(pid)
        return total

    ingest.wait_quiet(max_s, ours, log)


def wait_pushes(ctl: ControlClient, expected: int, quiet_s: float, hold_until: float) -> None:
    """Until the stand-in accepted `expected` pushes, or none came for `quiet_s` after the hold."""
    last, since = -1, time.monotonic()
    while True:
        got = int(ctl.stats()["accepted"])
        if got >= expected:
            time.sleep(0.5)  # a little longer, so late duplicates are seen too
            return
        if got != last or time.time() < hold_until:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            log(f"gave up waiting: {got:,} of {expected:,} pushes after {quiet_s:g} s without one")
            return
        time.sleep(POLL_S)


def summarise_posts(result: Result, posts: Posts) -> None:
    result.notifications = len(posts.status)
    result.posts_acked = sum(1 for s in posts.status if s == 201)
    result.post_errors = dict(posts.errors)
    result.post_s = max(posts.acked) - min(posts.sent) if posts.sent else 0.0
    result.post_rate = result.notifications / result.post_s if result.post_s else 0.0
    answer = sorted(1e3 * (a - s) for a, s in zip(posts.acked, posts.sent, strict=True))
    result.post_p50_ms = percentile(answer, 50)
    result.post_p99_ms = percentile(answer, 99)


def tally(
    args: argparse.Namespace,
    result: Result,
    posts: Posts,
    records: list[dict[str, Any]],
    targets_of: dict[int, list[str]],
    sampler: Sampler,
) -> None:
    """Match the stand-in's record to the posts: rates, latency, missing, duplicates."""
    seq_of = {nid: seq for seq, nid in enumerate(posts.ids) if nid}
    user_targets = {u: set(ts) for u, ts in targets_of.items()}
    seen: Counter[tuple[int, str]] = Counter()
    first_at: list[float] = []
    lat_ack: list[float] = []
    lat_sent: list[float] = []
    sizes: list[int] = []
    plain: list[int] = []
    all_at: list[float] = []
    for r in records:
        all_at.append(float(r["at"]))
        message = r.get("message") or {}
        seq = seq_of.get(str(message.get("id")))
        if seq is None:
            result.unexpected += 1
            continue
        if r["target"] not in user_targets[posts.users[seq]]:
            result.misrouted += 1
            continue
        seen[(seq, r["target"])] += 1
        if seen[(seq, r["target"])] > 1:
            continue
        at = float(r["at"])
        first_at.append(at)
        lat_ack.append(1e3 * (at - posts.acked[seq]))
        lat_sent.append(1e3 * (at - posts.sent[seq]))
        sizes.append(int(r["details"].get("encrypted_size", 0)))
        result.sample_message = result.sample_message or message
        plain.append(len(json.dumps(message, separators=(",", ":")).encode()))
    result.received = len(first_at)
    result.missing = result.expected - result.received
    result.duplicates = sum(n - 1 for n in seen.values() if n > 1)
    if sizes:
        result.encrypted_bytes = sum(sizes) / len(sizes)
        result.message_bytes = sum(plain) / len(plain)
    if not all_at:
        return
    all_at.sort()
    first_post = min(posts.sent)
    last = all_at[-1]
    n = len(all_at)
    result.push_s = last - first_post
    result.push_rate = n / result.push_s if result.push_s > 0 else 0.0
    result.steady_rate = middle_rate(all_at)
    window = sampler.window(first_post, last)
    if args.preload:
        k = min(args.push_concurrency, n - 1)
        release = all_at[k - 1] if k > 0 else all_at[0]
        result.drain_s = last - release
        result.drain_rate = (n - k) / result.drain_s if result.drain_s > 0 else 0.0
        result.drain_steady_rate = middle_rate(all_at[k:])
        window = sampler.window(release, last)
        result.cpu_post = sampler.window(first_post, max(posts.acked))
        pushes = n - k
    else:
        lat_ack.sort()
        lat_sent.sort()
        result.latency_p50_ms = percentile(lat_ack, 50)
        result.latency_p99_ms = percentile(lat_ack, 99)
        result.latency_max_ms = lat_ack[-1]
        result.latency_sent_p50_ms = percentile(lat_sent, 50)
        result.latency_sent_p99_ms = percentile(lat_sent, 99)
        pushes = n
    result.cpu = window
    if window and pushes:
        result.herald_us_per_push = 1e6 * window["herald_cpu_s"] / pushes
        result.standin_us_per_push = (
            1e4 * window.get("standin_pct", 0.0) * window["wall_s"] / pushes
        )


def middle_rate(times: Sequence[float]) -> float:
    """Pushes per second over the middle 80 % of them (sorted acceptance times)."""
    n = len(times)
    lo, hi = int(0.1 * n), int(0.9 * n) - 1
    if hi <= lo or times[hi] <= times[lo]:
        return 0.0
    return (hi - lo) / (times[hi] - times[lo])


# -- profiling (--py-spy) --------------------------------------------------------------------------


def start_py_spy(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    if not args.py_spy:
        return None
    exe = Path(sys.executable).parent / "py-spy"
    py_spy = str(exe) if exe.exists() else shutil.which("py-spy")
    if not py_spy:
        raise RuntimeError("--py-spy: py-spy is not installed (pip install py-spy)")
    out = args.work / "herald-py-spy.txt"
    argv = [py_spy, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(out)]
    argv += ["--gil", "--nolineno"]
    log(f"py-spy: sampling Herald (holding the GIL only) into {out}")
    with (args.work / "py-spy.log").open("wb") as err:
        return subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT)


def stop_py_spy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summarise_profile(path: Path, top: int = 25) -> str:
    """Herald's frames by samples, from py-spy's collapsed stacks: inclusive (anywhere on the
    stack) and self (the innermost frame), in % of the samples holding the GIL."""
    if not path.exists():
        return "(no py-spy output)"
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not total:
        return "(no samples)"
    lines = [
        f"{total:,} samples holding the GIL; inclusive % (self %), top {top} by inclusive "
        "(frames on every sample left out):"
    ]
    informative = [(f, n) for f, n in inclusive.most_common() if n < total or own[f]]
    for frame, n in informative[:top]:
        lines.append(f"{100 * n / total:5.1f}% ({100 * own[frame] / total:4.1f}%) {frame[:150]}")
    lines.append(f"top {top // 2} by self:")
    for frame, n in own.most_common(top // 2):
        lines.append(f"{100 * n / total:5.1f}% {frame[:150]}")
    return "\n".join(lines)


# -- report ----------------------------------------------------------------------------------------


def failure(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError):
        return str(exc)
    import traceback

    return "".join(traceback.format_exception(exc)).strip()


def problems(path: Path, limit: int = 12) -> str:
    """Errors and warnings Herald logged, counted by kind."""
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                if str(entry.get("level", "")).lower() in {"warning", "error", "critical"}:
                    kinds[f"{entry['level']}: {str(entry.get('message', '')).strip()}"[:200]] += 1
            elif any(k in line for k in ("Traceback", "Error", "ERROR", "WARNING")):
                kinds[line.strip()[:200]] += 1
    return "\n".join(f"{n}x {kind}" for kind, n in kinds.most_common(limit))


def checks(r: Result) -> dict[str, bool]:
    return {
        f"every POST answered 201 ({r.posts_acked:,}/{r.notifications:,})": (
            r.posts_acked == r.notifications > 0
        ),
        f"0 missing pushes ({r.missing:,})": r.missing == 0 and r.received > 0,
        f"0 duplicate pushes ({r.duplicates:,})": r.duplicates == 0,
        f"0 misrouted or unexpected ({r.misrouted + r.unexpected:,})": (
            r.misrouted + r.unexpected == 0
        ),
        f"0 refused by the stand-in ({r.refused:,})": r.refused == 0,
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "-"


def cpu_line(cpu: dict[str, float]) -> str:
    if not cpu:
        return "(no samples)"
    parts = [
        f"Herald {cpu.get('herald_pct', 0):.0f} (event loop thread "
        f"{cpu.get('herald_loop_pct', 0):.0f})",
        *([f"PostgreSQL {cpu['postgres_pct']:.0f}"] if "postgres_pct" in cpu else []),
        f"stand-in {cpu.get('standin_pct', 0):.0f}",
        f"harness {cpu.get('harness_pct', 0):.0f}",
        f"everything else {cpu.get('other_pct', 0):.0f}",
    ]
    return ", ".join(parts) + f" (% of one core, {cpu['wall_s']:.1f} s)"


def print_report(
    args: argparse.Namespace, base: list[Rate], extras: list[Rate], r: Result | None
) -> None:
    p = print
    enc = mean([b.per_s for b in base])
    enc_us = mean([b.cpu_us for b in base])
    posting = (
        f"at {args.rate:g}/s (open loop)"
        if args.rate > 0
        else f"as fast as ingest answers ({args.connections} connections)"
    )
    p()
    p(
        f"Web Push through Herald ({args.store}): {args.users:,} users x {args.devices} "
        f"device(s), {args.notifications:,} notifications posted {posting}, "
        f"push_concurrency {args.push_concurrency}"
    )
    if args.preload:
        p(
            f"--preload: the stand-in held the first {args.push_concurrency} pushes for "
            f"{args.hold:g} s, so every push was queued before any completed"
        )
    p(
        "Machine: 2 cores shared by Herald (1 process), the Web Push stand-in (1 process: TLS, "
        "VAPID check, decrypts, parses and records every push; it has no sampling option, so "
        "verification is full) and this harness (baseline loop, poster, /proc sampled 5 times "
        "a second)."
    )
    head = (
        f"{'':<36} {'per s':>8} {'vs encrypt':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'missing':>7} {'dup':>4}"
    )
    p(head)
    p("-" * len(head))
    if base:
        runs = " / ".join(f"{b.per_s:,.0f}" for b in base)
        p(
            f"{'baseline: http_ece encrypt, 1 thread':<36} {enc:>8,.0f} {'1.000x':>10}   "
            f"(runs {runs}; {enc_us:.0f} µs CPU each)"
        )
    if r is not None and r.received:
        lat = (
            f"{r.latency_p50_ms:>8.1f} {r.latency_p99_ms:>8.1f} {r.latency_max_ms:>8.1f}"
            if not r.preload
            else f"{'-':>8} {'-':>8} {'-':>8}"
        )
        miss = f"{r.missing:>7,} {r.duplicates:>4,}"
        rows = [
            ("Herald pushes, first POST..last", r.push_rate, f"{lat} {miss}"),
            ("Herald pushes, middle 80 %", r.steady_rate, ""),
        ]
        if r.preload:
            rows += [
                ("Herald drain of the queue, all", r.drain_rate, ""),
                ("Herald drain of the queue, mid 80 %", r.drain_steady_rate, ""),
            ]
        for name, value, rest in rows:
            p(f"{name:<36} {value:>8,.0f} {ratio(value, enc):>10} {rest}".rstrip())
        if r.herald_us_per_push and base:
            per_cpu_s = 1e6 / r.herald_us_per_push
            p(
                f"{'Herald pushes per CPU-second':<36} {per_cpu_s:>8,.0f} "
                f"{ratio(enc_us, r.herald_us_per_push):>10}   (vs encrypt's "
                f"{1e6 / enc_us:,.0f}" + ("; ingest included)" if not r.preload else ")")
            )
        p(
            f"{'notifications posted (201)':<36} {r.post_rate:>8,.0f} {'':>10} "
            f"{r.post_p50_ms:>8.1f} {r.post_p99_ms:>8.1f}   (time to the 201)"
        )
    else:
        reason = (r.error if r else None) or ("not run" if r is None else "no pushes arrived")
        p(f"{'Herald':<36} NOT MEASURED: {reason.splitlines()[0][:200]}")
    if r is not None and r.received and not r.preload:
        p("  latency: from the POST's 201 to the stand-in accepting the push (wall clock)")
        if args.rate <= 0:
            p(
                "  (posting as fast as ingest answers saturates the push engine: latency is "
                "mostly time queued behind earlier pushes; --rate R below the push rate "
                "measures it at a sustainable load)"
            )
    for b in extras:
        p(f"  informational, {b.name}: {b.per_s:,.0f}/s ({b.cpu_us:.0f} µs) - {b.note}")
    if r is None:
        return
    p()
    p(
        f"pushes: expected {r.expected:,}, received {r.received:,}, missing {r.missing:,}, "
        f"duplicates {r.duplicates:,}, misrouted {r.misrouted:,}, unexpected {r.unexpected:,}, "
        f"refused {r.refused:,}" + (f" {r.refusals}" if r.refusals else "")
    )
    if r.received:
        if not r.preload:
            p(
                f"  latency from the POST being sent: p50 {r.latency_sent_p50_ms:.1f} ms, "
                f"p99 {r.latency_sent_p99_ms:.1f} ms"
            )
        p(
            f"  Herald's push message: {r.message_bytes:.0f} bytes of JSON, "
            f"{r.encrypted_bytes:.0f} encrypted (the baseline's: {len(sample_message())})"
        )
        p(
            f"  {r.posts_acked:,} POSTs answered in {r.post_s:.2f} s; pushes over {r.push_s:.2f} s"
            + (f" (drain {r.drain_s:.2f} s after the hold)" if r.preload else "")
            + f"; pushes accepted before the last 201: {r.accepted_while_posting:,}"
        )
        if r.preload and r.cpu_post:
            p(f"  CPU while posting: {cpu_line(r.cpu_post)}")
        what = "while draining" if r.preload else "from the first POST to the last push"
        p(f"  CPU {what}: {cpu_line(r.cpu)}")
        cap = f" (one core: ~{1e6 / r.standin_us_per_push:,.0f}/s)" if r.standin_us_per_push else ""
        p(
            f"  CPU per push: Herald {r.herald_us_per_push:,.0f} µs"
            + (" (its ingest included)" if not r.preload else "")
            + f", stand-in {r.standin_us_per_push:,.0f} µs{cap}"
            + (f"; baseline encrypt {enc_us:.0f} µs" if base else "")
        )
        p(
            f"  Herald RSS: {r.herald_rss_before_kb / 1024:.1f} MiB when posting began, peak "
            f"{r.cpu.get('herald_rss_peak_kb', 0) / 1024:.1f} while pushing, "
            f"{r.herald_rss_end_kb / 1024:.1f} at the end (VmHWM {r.herald_rss_hwm_kb / 1024:.1f})"
        )
        p(
            f"  Herald's metrics: push attempts {r.herald_attempts} (20 of them the warm-up), "
            f"mean push request {r.herald_push_ms:.1f} ms"
        )
        if r.cpu.get("other_pct", 0) > NOISY_OTHER_PCT:
            p(
                f"  warning: other processes used {r.cpu['other_pct']:.0f}% of a core meanwhile: "
                "rates and latency include that contention"
            )
    if r.post_errors:
        p(f"  POST errors: {r.post_errors}")
    if r.server_log:
        p("  Herald log (errors/warnings, by kind):")
        for line in r.server_log.splitlines():
            p(f"    {line}")
    if r.error:
        p(f"  ERROR: {r.error}")
    if r.profile:
        p()
        p("py-spy, Herald while pushing:")
        p(r.profile)
    p()
    for name, ok in checks(r).items():
        p(f"  [{'PASS' if ok else 'FAIL'}] {name}")


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, default=1000, help="users (1000)")
    ap.add_argument("--devices", type=int, default=1, help="Web Push subscriptions per user (1)")
    ap.add_argument(
        "--notifications", type=int, default=10_000, help="notifications posted (10,000)"
    )
    ap.add_argument(
        "--rate", type=float, default=0.0, help="posts/s, open loop (0: as fast as ingest answers)"
    )
    ap.add_argument("--connections", type=int, default=32, help="the poster's connections (32)")
    ap.add_argument(
        "--duration", type=float, default=3.0, help="seconds of each baseline encrypt run (3)"
    )
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--postgres-url", help="PostgreSQL URL (default: run scripts/postgres as root)")
    ap.add_argument(
        "--push-concurrency", type=int, default=64, help="HERALD_PUSH_CONCURRENCY (64, its default)"
    )
    ap.add_argument(
        "--preload",
        action="store_true",
        help="hold the first pushes so all are queued before any completes; measure the drain",
    )
    ap.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="--preload: seconds the first pushes are held (0: 5 + notifications/1,000)",
    )
    ap.add_argument("--drain", type=float, default=10.0, help="max seconds without a push (10)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before posting, wait up to S s for the rest of the machine to be idle",
    )
    ap.add_argument("--targets", default="baseline,herald", help="baseline,herald (both)")
    ap.add_argument("--py-spy", action="store_true", help="profile Herald while pushing (--keep)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if set(args.targets) - {"baseline", "herald"} or not args.targets:
        ap.error("--targets: baseline and/or herald")
    if args.users < 1 or args.devices < 1 or args.notifications < 1:
        ap.error("--users, --devices and --notifications must be positive")
    args.keep = args.keep or args.py_spy
    if args.hold <= 0:
        args.hold = 5.0 + args.notifications / 1000
    return args


def ratios(r: Result | None, base: list[Rate]) -> dict[str, float] | None:
    """Herald / baseline: throughput, and CPU time per push (steadier on a busy machine)."""
    if r is None or not base or not r.received:
        return None
    enc, enc_us = mean([b.per_s for b in base]), mean([b.cpu_us for b in base])
    out = {
        "pushes_vs_encrypt": r.push_rate / enc,
        "steady_vs_encrypt": r.steady_rate / enc,
        "cpu_per_push_vs_encrypt": enc_us / r.herald_us_per_push if r.herald_us_per_push else 0.0,
    }
    if r.preload:
        out["drain_vs_encrypt"] = r.drain_rate / enc
        out["drain_steady_vs_encrypt"] = r.drain_steady_rate / enc
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    procs = ingest.Processes()
    work = Path(tempfile.mkdtemp(prefix="herald-push-"))
    args.work = work
    base: list[Rate] = []
    extras: list[Rate] = []
    result: Result | None = None
    bench = Baseline()
    try:
        with ingest.signals_stop(procs):
            if "baseline" in args.targets:
                log(f"baseline: encrypting for {args.duration:g} s")
                base.append(bench.main(args.duration))
                log(f"baseline: {base[-1].per_s:,.0f} messages/s")
            if "herald" in args.targets:
                result = run_herald(args, procs, work)
                if result.error:
                    log(f"herald: {result.error}")
            if "baseline" in args.targets:
                log(f"baseline: encrypting for {args.duration:g} s, then the informational rates")
                base.append(bench.main(args.duration))
                extras = bench.extras(max(0.5, args.duration / 3))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        doc = {
            "config": {
                k: getattr(args, k)
                for k in (
                    "users",
                    "devices",
                    "notifications",
                    "rate",
                    "connections",
                    "duration",
                    "store",
                    "push_concurrency",
                    "preload",
                    "hold",
                )
            },
            "baseline": {
                "encrypt_per_s": mean([b.per_s for b in base]),
                "runs": [asdict(b) for b in base],
                "informational": [asdict(b) for b in extras],
                "message_bytes": len(sample_message()),
            },
            "herald": asdict(result) if result else None,
            "ratios": ratios(result, base),
            "checks": checks(result) if result else None,
        }
        print(json.dumps(doc, indent=2, default=str))
    else:
        print_report(args, base, extras, result)
    return 0 if result is None or all(checks(result).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
