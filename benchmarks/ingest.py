"""Durable ingest benchmark: `POST /beta/me/notifications` at 64 connections, Herald vs a bare app.

Each target is a real server process on 127.0.0.1, started and stopped by this script, loaded by
`wrk` (see `ingest.lua`) one at a time: warm-up, then a measured interval.

    bare     benchmarks/bare.py under uvicorn with the flags `herald serve` uses
    sqlite   `herald serve --data DIR --port P` (embedded default store)
    postgres `herald serve --data DIR --port P --store URL` (a fresh schema per run)

The bare app is measured before and after each Herald target ("bracketing"), and each Herald
figure is compared with the mean of the two bare runs around it, so slow drift of the machine
cancels out. Requests are real: valid notification bodies with a unique appNotificationId, RS256
bearer tokens for `--users` users minted by the server's own issuer key, rate limiting on (with
limits set high via HERALD_*_RATE/BURST so it never throttles). After each Herald run the rows in
the store are counted and compared with the 201s wrk saw.

Besides requests/s the script reports server CPU time per request (from /proc), which is much less
sensitive than throughput to other load on the machine, and the CPU used by anything else during
the measured interval, so a noisy run can be recognised.

Usage: .venv/bin/python benchmarks/ingest.py [--duration 10] [--targets sqlite,postgres] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LUA = HERE / "ingest.lua"
HOST = "127.0.0.1"
HOST_NAME = "bench.example.com"
PATH = "/beta/me/notifications"
# Generous limits: rate limiting stays on (every request is checked) but never throttles.
LIMITS_ENV = {
    "HERALD_APP_RATE": "1000000000",
    "HERALD_APP_BURST": "1000000000",
    "HERALD_USER_RATE": "1000000000",
    "HERALD_USER_BURST": "1000000000",
}
TARGET_RATIO = {"sqlite": 0.5, "postgres": 0.4}
TARGET_P99_MS = 25.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One wrk interval against one server."""

    target: str
    phase: str  # "warmup" | "measured"
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    created: int  # 201s
    other_status: int  # any other status
    socket_errors: int  # connect/read/write/timeout
    unanswered: int  # requests in flight when wrk stopped (answered, if at all, after it left)
    first_bad: str
    server_cpu_us_per_req: float | None = None
    wrk_cpu_pct: float | None = None  # of one core
    db_cpu_us_per_req: float | None = None  # PostgreSQL server processes, per request
    other_cpu_pct: float | None = None  # everything else on the machine, % of one core
    workers: int = 1  # server processes (--workers)
    redis_cpu_us_per_req: float | None = None  # the Redis broker's server, per request

    @property
    def label(self) -> str:
        return f"{self.target} x{self.workers}"

    @property
    def errors(self) -> int:
        return self.other_status + self.socket_errors


@dataclass
class Durability:
    rows_before: int
    rows_after: int
    changes_after: int
    created: int  # 201s wrk saw, warm-up + measured
    unanswered: int  # requests wrk left in flight (may or may not have been committed)

    @property
    def rows(self) -> int:
        return self.rows_after - self.rows_before

    @property
    def ok(self) -> bool:
        # Every acknowledged write is there; the only extra rows are requests wrk abandoned
        # mid-flight when its interval ended; and each notification has its change record.
        return (
            self.created <= self.rows <= self.created + self.unanswered
            and self.changes_after >= self.rows_after
        )


@dataclass
class Target:
    name: str
    measured: Run | None = None
    warmup: Run | None = None
    durability: Durability | None = None
    error: str | None = None
    bare: list[Run] = field(default_factory=list)  # the bare runs bracketing this target
    workers: int = 1


# -- processes -------------------------------------------------------------------------------------


class Processes:
    """Servers started by this script; each is stopped by its own process group id."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # uvicorn: graceful shutdown, lifespan exit
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, timeout=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free now (a port and its workers'). Taken
    below the kernel's ephemeral range, where client connections take their ports: on a machine
    with many connections open, consecutive free ports there are rare."""
    rng = random.Random()
    for _ in range(500):
        first = rng.randrange(20_000, 32_000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
                    sock.bind((HOST, port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free range of ports")


def start_redis(procs: Processes, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server for the multi-worker runs (the Redis broker), on a free port."""
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is required for --workers above 1")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    proc = procs.start(argv, dict(os.environ), work / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return proc, f"redis://{HOST}:{port}/0"
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start:\n{tail(work / 'redis.log')}")


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer on port {port} within 30 s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its descendants (a supervisor and its workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, grown = {pid}, True
    while grown:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    total = 0.0
    for member in tree:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(member)
    return total


def pids_cpu_seconds(pids: list[int]) -> list[float]:
    """CPU of each of these processes (0 for one that has exited)."""
    out = []
    for pid in pids:
        try:
            out.append(proc_cpu_seconds(pid))
        except OSError:
            out.append(0.0)
    return out


def postgres_cpu_seconds() -> float:
    """CPU of every running PostgreSQL process (the store's own work, not 'other' load)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        if name == "postgres":
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all cores, since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK


def own_cpu() -> float:
    """CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


QUIET_CORES = 0.15  # --wait-quiet: "idle" is other processes using less CPU than this
QUIET_S = 5.0  # for this long


def wait_quiet(max_s: float, ours: Callable[[], float], log: Callable[[str], None]) -> None:
    """Wait (up to max_s) until the rest of the machine has been idle for QUIET_S: it has 2
    cores, and anything else running there shows up directly in the figures. `ours` is the CPU
    time of the run's own processes (idle connections still cost a little)."""
    deadline = time.monotonic() + max_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        busy0, ours0 = system_busy_seconds(), ours()
        time.sleep(1.0)
        if (system_busy_seconds() - busy0) - (ours() - ours0) >= QUIET_CORES:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            return
    if max_s > 0:
        log(f"the machine is still busy after {max_s:g} s; measuring anyway")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- wrk -------------------------------------------------------------------------------------------


def find_wrk(install: bool) -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing wrk (apt-get install -y wrk)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=True)
        wrk = shutil.which("wrk")
        if wrk:
            return wrk
    sys.exit(
        "ingest: wrk is required: `apt-get install -y wrk` (or run with --install-wrk as root)"
    )


def run_wrk(
    args: argparse.Namespace,
    target: str,
    phase: str,
    port: int,
    tokens: Path,
    seconds: float,
    server_pid: int,
    workers: int = 1,
    redis_pid: int | None = None,
    db_pids: Callable[[], list[int]] | None = None,
) -> Run:
    expiration = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    argv = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        f"http://{HOST}:{port}{PATH}",
        "--",
        str(tokens),
        HOST_NAME,
        phase[0],
        expiration,
        *(["keys"] if args.idempotency_keys else []),
    ]
    # With `db_pids` (--workers), only this server's own backends: the PostgreSQL server is
    # shared, and other sessions' backends come and go (a sum over all of them can even drop).
    own = db_pids() if db_pids else []
    db0 = postgres_cpu_seconds() if target == "postgres" and not db_pids else 0.0
    db0 += sum(pids_cpu_seconds(own))
    redis0 = proc_cpu_seconds(redis_pid) if redis_pid else 0.0
    cpu0, busy0, kids0 = tree_cpu_seconds(server_pid), system_busy_seconds(), children_cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu1, busy1, kids1 = tree_cpu_seconds(server_pid), system_busy_seconds(), children_cpu_seconds()
    db1 = postgres_cpu_seconds() if target == "postgres" and not db_pids else 0.0
    db_cpu = db1 + sum(pids_cpu_seconds(own)) - db0
    redis_cpu = proc_cpu_seconds(redis_pid) - redis0 if redis_pid else 0.0
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    w: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    lat, err = w["latency_us"], w["errors"]
    duration = w["duration_us"] / 1e6
    # The server's own processes are not this script's children (wrk is): they run in their own
    # session and are only reaped at the end, so RUSAGE_CHILDREN counts wrk alone here.
    server_cpu, wrk_cpu = cpu1 - cpu0, kids1 - kids0
    other = max(0.0, (busy1 - busy0) - server_cpu - wrk_cpu - db_cpu - redis_cpu)
    return Run(
        target=target,
        phase=phase,
        duration_s=duration,
        requests=w["requests"],
        rps=w["requests"] / duration if duration else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        p999_ms=lat["p999"] / 1000,
        max_ms=lat["max"] / 1000,
        mean_ms=lat["mean"] / 1000,
        created=w["created"],
        other_status=w["other"],
        socket_errors=err["connect"] + err["read"] + err["write"] + err["timeout"],
        unanswered=max(0, w["sent"] - w["received"]),
        first_bad=w["first_bad"],
        server_cpu_us_per_req=server_cpu / w["requests"] * 1e6 if w["requests"] else None,
        wrk_cpu_pct=100 * wrk_cpu / duration if duration else None,
        db_cpu_us_per_req=db_cpu / w["requests"] * 1e6 if w["requests"] else None,
        other_cpu_pct=100 * other / duration if duration else None,
        workers=workers,
        redis_cpu_us_per_req=redis_cpu / w["requests"] * 1e6
        if w["requests"] and redis_pid
        else None,
    )


# -- tokens and stores -----------------------------------------------------------------------------


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Drop inherited HERALD_* so the user's own configuration cannot leak into the run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(LIMITS_ENV)
    env.update(extra or {})
    return env


def herald_bin() -> str:
    local = Path(sys.executable).parent / "herald"
    found = str(local) if local.exists() else shutil.which("herald")
    if not found:
        sys.exit("ingest: the `herald` command is not installed in this environment")
    return found


def register_app(data: Path, store_url: str | None, env: dict[str, str]) -> str:
    argv = [herald_bin(), "app", "create", "--host-name", HOST_NAME, "--data", str(data)]
    if store_url:
        argv += ["--store", store_url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"herald app create failed:\n{done.stdout}{done.stderr}")
    return str(json.loads(done.stdout)["clientId"])


def mint_tokens(data: Path, port: int, client_id: str, users: int, out: Path) -> None:
    """Delegated tokens for `users` users, signed with the key the server will load from `data`."""
    from herald.auth.issuer import LocalIssuer
    from herald.settings import load

    # The same settings the server computes from its flags and environment.
    settings = load({"data": str(data), "port": port}, env=server_env()).settings
    issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    ttl = 3 * 3600
    lines = [
        issuer.mint(client_id=client_id, user_id=f"bench-user-{i:05d}", ttl_seconds=ttl)
        for i in range(users)
    ]
    out.write_text("\n".join(lines) + "\n")


def postgres_url(args: argparse.Namespace) -> str:
    if args.postgres_url:
        return str(args.postgres_url)
    if os.geteuid() != 0:
        raise RuntimeError(
            "PostgreSQL: pass --postgres-url URL, or run as root to use scripts/postgres"
        )
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "postgres")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/postgres failed:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def backends(admin_url: str, application_name: str) -> Callable[[], list[int]]:
    """The pids of the PostgreSQL backends serving `application_name` (a store URL's)."""
    sql = (
        "SELECT coalesce(string_agg(pid::text, ','), '') FROM pg_stat_activity"
        f" WHERE application_name = '{application_name}'"
    )
    return lambda: [int(pid) for pid in str(pg(admin_url, sql)).split(",") if pid]


def with_search_path(url: str, schema: str) -> str:
    # asyncpg turns unknown URL query parameters into server settings for every connection.
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


async def _pg(url: str, sql: str) -> Any:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def pg(url: str, sql: str) -> Any:
    return asyncio.run(_pg(url, sql))


class Store:
    """Counts rows in the store under test (notifications and their change records)."""

    def __init__(self, sqlite_path: Path | None = None, pg_url: str | None = None) -> None:
        self.sqlite_path = sqlite_path
        self.pg_url = pg_url

    def count(self, table: str) -> int:
        sql = f"SELECT count(*) FROM {table}"
        if self.sqlite_path is not None:
            conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=30)
            try:
                return int(conn.execute(sql).fetchone()[0])
            finally:
                conn.close()
        assert self.pg_url is not None
        return int(pg(self.pg_url, sql))

    def settled(self) -> int:
        """The notification count once requests wrk abandoned have finished."""
        last = self.count("notifications")
        for _ in range(50):
            time.sleep(0.2)
            now = self.count("notifications")
            if now == last:
                return now
            last = now
        return last


# -- targets ---------------------------------------------------------------------------------------


def uvicorn_flags(app: str, port: int) -> list[str]:
    """uvicorn's arguments for a baseline app in this directory: the flags `herald serve` uses."""
    return [
        app,
        "--app-dir",
        str(HERE),
        "--host",
        HOST,
        "--port",
        str(port),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--ws",
        "websockets-sansio",
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def bench_bare(
    args: argparse.Namespace, procs: Processes, work: Path, tokens: Path, workers: int = 0
) -> Run:
    """The bare app; with `workers`, as that many processes each with its own SO_REUSEPORT
    socket (bare.py's `serve`, what `herald serve --workers` does)."""
    port = free_port()
    log_path = work / f"bare-{port}.log"
    argv = [sys.executable, "-m", "uvicorn", *uvicorn_flags("bare:app", port)]
    if workers:
        argv = [
            sys.executable,
            str(HERE / "bare.py"),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    proc = procs.start(argv, server_env(), log_path)
    n = max(1, workers)
    try:
        wait_ready(proc, port, "/", log_path)
        run_wrk(args, "bare", "warmup", port, tokens, args.warmup, proc.pid, n)
        return run_wrk(args, "bare", "measured", port, tokens, args.duration, proc.pid, n)
    finally:
        procs.stop(proc)


def bench_herald(
    args: argparse.Namespace,
    procs: Processes,
    work: Path,
    name: str,
    target: Target,
    redis: tuple[int, str] | None = None,
) -> None:
    """Run one Herald target: register an app, mint tokens, serve, load, count rows. With
    `target.workers` > 1, `herald serve --workers N` on the Redis broker `redis` (pid, URL)."""
    data = work / f"{name}-{target.workers}"
    data.mkdir()
    workers = target.workers
    port = free_ports(workers + 1) if workers > 1 else free_port()
    store_url: str | None = None
    pg_admin: str | None = None
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    if name == "postgres":
        pg_admin = postgres_url(args)
        pg(pg_admin, f"CREATE SCHEMA {schema}")
        store_url = with_search_path(pg_admin, schema)
        if args.workers:  # its own backends, found by their application_name
            store_url += f"&application_name={schema}"
        store = Store(pg_url=store_url)
    else:
        store = Store(sqlite_path=data / "herald.db")
    try:
        env = server_env()
        client_id = register_app(data, store_url, env)
        tokens = work / f"tokens-{name}-{workers}.txt"
        mint_tokens(data, port, client_id, args.users, tokens)
        argv = [herald_bin(), "serve", "--data", str(data), "--port", str(port)]
        if store_url:
            argv += ["--store", store_url]
        redis_pid = None
        if workers > 1:
            assert redis is not None
            redis_pid = redis[0]
            argv += ["--workers", str(workers)]
            env.update(
                HERALD_BROKER="redis", HERALD_REDIS_URL=redis[1], HERALD_WORKER_PORT=str(port + 1)
            )
        log_path = work / f"herald-{name}-{workers}.log"
        proc = procs.start(argv, env, log_path)
        try:
            wait_ready(proc, port, "/healthz", log_path)
            for index in range(workers if workers > 1 else 0):  # every worker serves
                wait_ready(proc, port + 1 + index, "/healthz", log_path)
            before = store.count("notifications")
            own = None
            if pg_admin is not None and args.workers:
                own = backends(pg_admin, schema)
            pids = (proc.pid, workers, redis_pid, own)
            target.warmup = run_wrk(args, name, "warmup", port, tokens, args.warmup, *pids)
            target.measured = run_wrk(args, name, "measured", port, tokens, args.duration, *pids)
            after = store.settled()
            target.durability = Durability(
                rows_before=before,
                rows_after=after,
                changes_after=store.count("changes"),
                created=target.warmup.created + target.measured.created,
                unanswered=target.warmup.unanswered + target.measured.unanswered,
            )
            if proc.poll() is not None:
                raise RuntimeError(f"herald exited during the run:\n{tail(log_path)}")
        finally:
            procs.stop(proc)
    finally:
        if pg_admin is not None:
            with contextlib.suppress(Exception):
                pg(pg_admin, f"DROP SCHEMA {schema} CASCADE")


# -- report ----------------------------------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def verdict(t: Target) -> dict[str, Any]:
    out: dict[str, Any] = {"target": t.name, "error": t.error}
    if t.measured is None or not t.bare:
        out["pass"] = False
        return out
    m = t.measured
    bare_rps = mean([b.rps for b in t.bare])
    bare_cpu = mean([b.server_cpu_us_per_req or 0.0 for b in t.bare])
    ratio = m.rps / bare_rps if bare_rps else 0.0
    cpu_ratio = bare_cpu / m.server_cpu_us_per_req if m.server_cpu_us_per_req else 0.0
    checks = {
        f"ratio >= {TARGET_RATIO[t.name]}": ratio >= TARGET_RATIO[t.name],
        f"p99 <= {TARGET_P99_MS:g} ms": m.p99_ms <= TARGET_P99_MS,
        "no errors (every response 201)": m.errors == 0
        and (t.warmup is None or t.warmup.errors == 0),
        "durable (rows = 201s)": t.durability is not None and t.durability.ok,
    }
    out.update(
        bare_rps=bare_rps,
        ratio=ratio,
        bare_cpu_us_per_req=bare_cpu,
        cpu_ratio=cpu_ratio,
        checks=checks,
        valid=checks["no errors (every response 201)"] and checks["durable (rows = 201s)"],
        **{"pass": all(checks.values())},
    )
    return out


def print_durability(t: Target) -> None:
    """After a Herald target's figures: its rows against its 201s, and its first non-201."""
    m, d = t.measured, t.durability
    assert m is not None
    if d is not None:
        print(
            f"  durability: {d.rows:,} rows added, {d.created:,} 201s seen "
            f"(+{d.unanswered} requests abandoned in flight by wrk at the end of an interval), "
            f"{d.changes_after:,} change records -> {'OK' if d.ok else 'MISMATCH'}"
        )
    if m.first_bad or (t.warmup and t.warmup.first_bad):
        print(f"  first non-201: {m.first_bad or (t.warmup.first_bad if t.warmup else '')}")


def print_report(args: argparse.Namespace, targets: list[Target], bare_runs: list[Run]) -> None:
    p = print
    p()
    p(
        f"POST {PATH}, {args.connections} connections, {args.threads} wrk thread(s), "
        f"{args.users} users, {args.warmup:g} s warm-up + {args.duration:g} s measured"
    )
    head = (
        f"{'target':<10} {'req/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'errors':>6} {'srv µs/req':>10} {'db µs/req':>9} {'wrk %':>6} {'other %':>7}"
    )
    p(head)
    p("-" * len(head))
    rows = [*bare_runs, *(t.measured for t in targets if t.measured)]
    order = {"bare": 0, "sqlite": 1, "postgres": 2}
    for r in sorted(rows, key=lambda r: order.get(r.target, 9)):
        p(
            f"{r.target:<10} {r.rps:>9,.0f} {r.p50_ms:>7.2f} {r.p90_ms:>7.2f} {r.p99_ms:>7.2f} "
            f"{r.max_ms:>7.1f} {r.errors:>6} {r.server_cpu_us_per_req or 0:>10.1f} "
            f"{r.db_cpu_us_per_req or 0:>9.1f} {r.wrk_cpu_pct or 0:>6.0f} "
            f"{r.other_cpu_pct or 0:>7.0f}"
        )
    p("  srv µs/req = server process CPU (all threads) per request; db µs/req = PostgreSQL's")
    p("  processes per request; wrk % = load generator CPU; other % = CPU used by anything else")
    p("  on the machine during the interval (% of one core).")
    for t in targets:
        p()
        if t.error:
            p(f"{t.name}: NOT MEASURED: {t.error}")
            continue
        v = verdict(t)
        m = t.measured
        assert m is not None
        p(
            f"{t.name}: {m.rps:,.0f} req/s = {v['ratio']:.2f}x bare ({v['bare_rps']:,.0f} req/s, "
            f"mean of {len(t.bare)} bracketing runs); CPU per request {v['cpu_ratio']:.2f}x bare's "
            f"efficiency ({m.server_cpu_us_per_req or 0:.0f} vs {v['bare_cpu_us_per_req']:.0f} µs)"
        )
        print_durability(t)
        for name, ok in v["checks"].items():
            p(f"  [{'PASS' if ok else 'FAIL'}] {name}")
        if not v["valid"]:
            p("  RUN INVALID: non-201 responses or missing rows")
    noisy = [r for r in rows if (r.other_cpu_pct or 0) > 15]
    if noisy:
        p()
        p(
            "warning: other processes used >15% of a core during "
            + ", ".join(sorted({r.target for r in noisy}))
            + "; throughput ratios are unreliable, compare srv µs/req instead"
        )


def log(msg: str) -> None:
    print(f"ingest: {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds (default 3)")
    ap.add_argument("--connections", type=int, default=64, help="concurrent connections (64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: 2-core box)")
    ap.add_argument("--users", type=int, default=1000, help="distinct users/tokens (1000)")
    ap.add_argument(
        "--targets", default="sqlite,postgres", help="Herald stores to measure (sqlite,postgres)"
    )
    ap.add_argument("--postgres-url", help="PostgreSQL URL (default: run scripts/postgres as root)")
    ap.add_argument("--install-wrk", action="store_true", help="apt-get install wrk if missing")
    ap.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="send a unique Idempotency-Key with every request",
    )
    ap.add_argument(
        "--workers",
        help="worker counts, e.g. 1,2: PostgreSQL with `herald serve --workers N` (Redis broker"
        " above 1) and the bare app with as many processes, in the same run",
    )
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.workers:
        try:
            args.workers = [int(n) for n in args.workers.split(",")]
        except ValueError:
            ap.error("--workers takes worker counts, e.g. 1,2")
        if not args.workers or min(args.workers) < 1:
            ap.error("--workers takes worker counts >= 1, e.g. 1,2")
        args.targets = ["postgres"]
    unknown = set(args.targets) - set(TARGET_RATIO)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if args.threads > args.connections:
        ap.error("--threads must not exceed --connections")
    return args


@contextlib.contextmanager
def signals_stop(procs: Processes) -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C, so `finally` blocks clean up servers and temp dirs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        procs.stop_all()
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.wrk = find_wrk(args.install_wrk)
    if args.workers:
        return main_workers(args)
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="herald-ingest-"))
    targets = [Target(name) for name in args.targets]
    bare_runs: list[Run] = []
    try:
        with signals_stop(procs):
            # The bare app gets the same request bytes: tokens of the same shape and size.
            bare_tokens = work / "tokens-bare.txt"
            mint_tokens(work / "bare", 0, str(uuid.uuid4()), args.users, bare_tokens)
            log("bare: running")
            previous = bench_bare(args, procs, work, bare_tokens)
            bare_runs.append(previous)
            log(f"bare: {previous.rps:,.0f} req/s")
            for target in targets:
                log(f"{target.name}: running")
                try:
                    bench_herald(args, procs, work, target.name, target)
                except (RuntimeError, OSError, sqlite3.Error) as exc:
                    target.error = str(exc)
                    log(f"{target.name}: {exc}")
                    continue
                m = target.measured
                assert m is not None
                log(f"{target.name}: {m.rps:,.0f} req/s, p99 {m.p99_ms:.2f} ms, errors {m.errors}")
                log("bare: running")
                after = bench_bare(args, procs, work, bare_tokens)
                bare_runs.append(after)
                log(f"bare: {after.rps:,.0f} req/s")
                target.bare = [previous, after]
                previous = after
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    verdicts = [verdict(t) for t in targets]
    if args.json:
        doc = {
            "config": {
                k: getattr(args, k)
                for k in ("duration", "warmup", "connections", "threads", "users", "targets")
            },
            "bare": [asdict(r) for r in bare_runs],
            "targets": [
                {
                    "name": t.name,
                    "error": t.error,
                    "warmup": asdict(t.warmup) if t.warmup else None,
                    "measured": asdict(t.measured) if t.measured else None,
                    "durability": (
                        {**asdict(t.durability), "rows": t.durability.rows, "ok": t.durability.ok}
                        if t.durability
                        else None
                    ),
                    "verdict": v,
                }
                for t, v in zip(targets, verdicts, strict=True)
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        print_report(args, targets, bare_runs)
    return 0 if all(v.get("pass") for v in verdicts) else 1


# -- --workers: PostgreSQL with 1, 2, ... workers against the bare app with as many --------------

TARGET_SCALING = 1.25  # the largest worker count's durable req/s over one worker's (2 cores)


def main_workers(args: argparse.Namespace) -> int:
    """For each worker count: the bare app, Herald on PostgreSQL, the bare app again (the two
    bare runs bracket Herald's, as in the default mode); then the scaling of each."""
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="herald-ingest-"))
    targets = [Target("postgres", workers=n) for n in args.workers]
    try:
        with signals_stop(procs):
            redis_proc, redis_url = start_redis(procs, work)
            bare_tokens = work / "tokens-bare.txt"
            mint_tokens(work / "bare", 0, str(uuid.uuid4()), args.users, bare_tokens)
            for target in targets:
                n = target.workers
                target.bare.append(workers_bare(args, procs, work, bare_tokens, n))
                log(f"postgres x{n}: running")
                try:
                    bench_herald(args, procs, work, "postgres", target, (redis_proc.pid, redis_url))
                    m = target.measured
                    assert m is not None
                    log(f"postgres x{n}: {m.rps:,.0f} req/s, p99 {m.p99_ms:.2f} ms")
                except (RuntimeError, OSError) as exc:
                    target.error = str(exc)
                    log(f"postgres x{n}: {exc}")
                target.bare.append(workers_bare(args, procs, work, bare_tokens, n))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report = workers_report(targets)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_workers_report(args, targets, report)
    return 0 if report["pass"] else 1


def workers_bare(
    args: argparse.Namespace, procs: Processes, work: Path, tokens: Path, workers: int
) -> Run:
    log(f"bare x{workers}: running")
    run = bench_bare(args, procs, work, tokens, workers)
    log(f"bare x{workers}: {run.rps:,.0f} req/s")
    return run


def workers_report(targets: list[Target]) -> dict[str, Any]:
    rows = []
    for t in targets:
        m = t.measured
        row: dict[str, Any] = {"workers": t.workers, "error": t.error}
        row["bare"] = [asdict(b) for b in t.bare]
        row["bare_rps"] = mean([b.rps for b in t.bare])
        row["bare_cpu_us_per_req"] = mean([b.server_cpu_us_per_req or 0.0 for b in t.bare])
        if m is not None:
            row["measured"] = asdict(m)
            row["ratio_to_bare"] = m.rps / row["bare_rps"] if row["bare_rps"] else 0.0
            row["durable"] = t.durability is not None and t.durability.ok
            row["errors"] = m.errors + (t.warmup.errors if t.warmup else 0)
        rows.append(row)
    one = next((r for r in rows if r["workers"] == 1 and "measured" in r), None)
    top = max((r for r in rows if "measured" in r), key=lambda r: r["workers"], default=None)
    out: dict[str, Any] = {"rows": rows, "pass": False}
    if one is None or top is None or top is one:
        return out
    herald_scaling = top["measured"]["rps"] / one["measured"]["rps"]
    bare_scaling = top["bare_rps"] / one["bare_rps"] if one["bare_rps"] else 0.0
    checks = {
        f"herald x{top['workers']} >= {TARGET_SCALING}x herald x1": herald_scaling
        >= TARGET_SCALING,
        **{
            f"x{r['workers']}: p99 <= {TARGET_P99_MS:g} ms": r["measured"]["p99_ms"]
            <= TARGET_P99_MS
            for r in rows
            if "measured" in r
        },
        **{
            f"x{r['workers']}: rows = 201s, every response 201": r["durable"] and r["errors"] == 0
            for r in rows
            if "measured" in r
        },
    }
    out.update(
        herald_scaling=herald_scaling,
        bare_scaling=bare_scaling,
        top=top["workers"],
        checks=checks,
        **{"pass": all(checks.values())},
    )
    return out


def print_workers_report(
    args: argparse.Namespace, targets: list[Target], report: dict[str, Any]
) -> None:
    p = print
    p()
    p(
        f"POST {PATH}, {args.connections} connections, {args.threads} wrk thread(s), "
        f"{args.users} users, {args.warmup:g} s warm-up + {args.duration:g} s measured; "
        f"PostgreSQL, Redis broker above 1 worker"
    )
    head = (
        f"{'target':<12} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6} "
        f"{'srv µs/req':>10} {'db µs/req':>9} {'redis µs':>8} {'wrk %':>6} {'other %':>7}"
    )
    p(head)
    p("-" * len(head))
    for t in targets:
        for r in [t.bare[0], *([t.measured] if t.measured else []), *t.bare[1:]]:
            p(
                f"{r.label:<12} {r.rps:>9,.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} "
                f"{r.errors:>6} {r.server_cpu_us_per_req or 0:>10.1f} "
                f"{r.db_cpu_us_per_req or 0:>9.1f} {r.redis_cpu_us_per_req or 0:>8.1f} "
                f"{r.wrk_cpu_pct or 0:>6.0f} {r.other_cpu_pct or 0:>7.0f}"
            )
    p("  srv µs/req = CPU of all the server's processes per request (supervisor and workers);")
    p("  db µs/req = this server's own PostgreSQL backends (by application_name; the shared")
    p("  server's WAL writer and checkpointer are left out, they also serve other sessions);")
    p("  redis µs = the Redis broker's server; other % = anything else, % of one core.")
    for t, row in zip(targets, report["rows"], strict=True):
        p()
        if t.error or t.measured is None:
            p(f"postgres x{t.workers}: NOT MEASURED: {t.error}")
            continue
        m = t.measured
        p(
            f"postgres x{t.workers}: {m.rps:,.0f} durable req/s = {row['ratio_to_bare']:.2f}x the"
            f" bare app x{t.workers} ({row['bare_rps']:,.0f} req/s, mean of {len(t.bare)} runs"
            f" around it), p99 {m.p99_ms:.1f} ms"
        )
        print_durability(t)
    if "herald_scaling" in report:
        p()
        p(
            f"scaling x{report['top']} / x1: Herald {report['herald_scaling']:.2f}x,"
            f" bare app {report['bare_scaling']:.2f}x (same run)"
        )
        for name, ok in report["checks"].items():
            p(f"  [{'PASS' if ok else 'FAIL'}] {name}")


if __name__ == "__main__":
    sys.exit(main())
