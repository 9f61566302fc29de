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
    db0 = postgres_cpu_seconds() if target == "postgres" else 0.0
    cpu0, busy0, kids0 = proc_cpu_seconds(server_pid), system_busy_seconds(), children_cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu1, busy1, kids1 = proc_cpu_seconds(server_pid), system_busy_seconds(), children_cpu_seconds()
    db_cpu = postgres_cpu_seconds() - db0 if target == "postgres" else 0.0
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    w: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    lat, err = w["latency_us"], w["errors"]
    duration = w["duration_us"] / 1e6
    server_cpu, wrk_cpu = cpu1 - cpu0, kids1 - kids0
    other = max(0.0, (busy1 - busy0) - server_cpu - wrk_cpu - db_cpu)
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


def bench_bare(args: argparse.Namespace, procs: Processes, work: Path, tokens: Path) -> Run:
    port = free_port()
    log_path = work / f"bare-{port}.log"
    argv = [sys.executable, "-m", "uvicorn", *uvicorn_flags("bare:app", port)]
    proc = procs.start(argv, server_env(), log_path)
    try:
        wait_ready(proc, port, "/", log_path)
        run_wrk(args, "bare", "warmup", port, tokens, args.warmup, proc.pid)
        return run_wrk(args, "bare", "measured", port, tokens, args.duration, proc.pid)
    finally:
        procs.stop(proc)


def bench_herald(
    args: argparse.Namespace, procs: Processes, work: Path, name: str, target: Target
) -> None:
    """Run one Herald target: register an app, mint tokens, serve, load, count rows."""
    data = work / name
    data.mkdir()
    port = free_port()
    store_url: str | None = None
    pg_admin: str | None = None
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    if name == "postgres":
        pg_admin = postgres_url(args)
        pg(pg_admin, f"CREATE SCHEMA {schema}")
        store_url = with_search_path(pg_admin, schema)
        store = Store(pg_url=store_url)
    else:
        store = Store(sqlite_path=data / "herald.db")
    try:
        env = server_env()
        client_id = register_app(data, store_url, env)
        tokens = work / f"tokens-{name}.txt"
        mint_tokens(data, port, client_id, args.users, tokens)
        argv = [herald_bin(), "serve", "--data", str(data), "--port", str(port)]
        if store_url:
            argv += ["--store", store_url]
        log_path = work / f"herald-{name}.log"
        proc = procs.start(argv, env, log_path)
        try:
            wait_ready(proc, port, "/healthz", log_path)
            before = store.count("notifications")
            target.warmup = run_wrk(args, name, "warmup", port, tokens, args.warmup, proc.pid)
            target.measured = run_wrk(args, name, "measured", port, tokens, args.duration, proc.pid)
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
        m, d = t.measured, t.durability
        assert m is not None
        p(
            f"{t.name}: {m.rps:,.0f} req/s = {v['ratio']:.2f}x bare ({v['bare_rps']:,.0f} req/s, "
            f"mean of {len(t.bare)} bracketing runs); CPU per request {v['cpu_ratio']:.2f}x bare's "
            f"efficiency ({m.server_cpu_us_per_req or 0:.0f} vs {v['bare_cpu_us_per_req']:.0f} µs)"
        )
        if d is not None:
            p(
                f"  durability: {d.rows:,} rows added, {d.created:,} 201s seen "
                f"(+{d.unanswered} requests abandoned in flight by wrk at the end of an interval), "
                f"{d.changes_after:,} change records -> {'OK' if d.ok else 'MISMATCH'}"
            )
        if m.first_bad or (t.warmup and t.warmup.first_bad):
            p(f"  first non-201: {m.first_bad or (t.warmup.first_bad if t.warmup else '')}")
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
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
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


if __name__ == "__main__":
    sys.exit(main())
