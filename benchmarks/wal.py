"""SQLite WAL under sustained writes: its size during and after load, with the bound and without.

For each duration (25 s and 90 s by default) and each mode, a fresh `herald serve` on SQLite is
loaded by `wrk` with `ingest.lua` (durable `POST /beta/me/notifications`, a unique
appNotificationId per request) over 16 connections, then left idle. The WAL and database files
are sampled every 50 ms throughout.

    bounded  Herald as configured by default (or `--limit BYTES`: HERALD_SQLITE_WAL_LIMIT)
    off      HERALD_SQLITE_WAL_LIMIT=0: PASSIVE checkpoints only, nothing bounds the WAL (the
             behaviour before the bound): the baseline, measured in the same run

Reported per run: WAL size (max under load, at the end of the load, after the idle period, and
the smallest seen while idle), database size, requests/s, latency p50/p90/p99/max, non-201s, and
Herald's own SQLite metrics (checkpoints, time writes were held). Then bounded/off ratios.

Usage: .venv/bin/python benchmarks/wal.py [--durations 25,90] [--idle 15] [--connections 16]
       [--limit BYTES] [--modes off,bounded] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import ingest  # shared helpers: processes, ports, wrk, tokens, app registration

MIB = 1024 * 1024


@dataclass
class Sizes:
    """WAL and database sizes sampled by a background thread."""

    wal_max: int = 0
    wal_at_load_end: int = 0
    wal_idle_min: int = 0
    wal_after_idle: int = 0
    db_at_load_end: int = 0
    db_after_idle: int = 0


@dataclass
class Result:
    mode: str
    duration: float
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    created: int = 0
    errors: int = 0
    other_cpu_pct: float = 0.0
    sizes: Sizes = field(default_factory=Sizes)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Sampler:
    """Polls the size of a file every `interval` s on a thread; keeps the largest."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        self.path = path
        self.interval = interval
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.largest = max(self.largest, self.size())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


REPORTED = (
    "herald_sqlite_checkpoints_total",
    "herald_sqlite_checkpoint_seconds_sum",
    "herald_sqlite_write_wait_seconds_count",
    "herald_sqlite_write_wait_seconds_sum",
    "herald_sqlite_write_failures_total",
)


def herald_metrics(port: int) -> dict[str, float]:
    """Herald's own SQLite figures from /metrics, by series (name and labels)."""
    text = httpx.get(f"http://{ingest.HOST}:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(REPORTED):
            series, _, value = line.rpartition(" ")
            out[series.removeprefix("herald_sqlite_")] = float(value)
    return out


def run_one(
    args: argparse.Namespace, procs: ingest.Processes, work: Path, mode: str, seconds: float
) -> Result:
    result = Result(mode, seconds)
    data = work / f"{mode}-{seconds:g}"
    data.mkdir()
    port = ingest.free_port()
    env = ingest.server_env()
    if mode == "off":
        env["HERALD_SQLITE_WAL_LIMIT"] = "0"
    elif args.limit is not None:
        env["HERALD_SQLITE_WAL_LIMIT"] = str(args.limit)
    client_id = ingest.register_app(data, None, env)
    tokens = work / f"tokens-{mode}-{seconds:g}.txt"
    ingest.mint_tokens(data, port, client_id, args.users, tokens)
    log_path = work / f"herald-{mode}-{seconds:g}.log"
    argv = [ingest.herald_bin(), "serve", "--data", str(data), "--port", str(port)]
    proc = procs.start(argv, env, log_path)
    wal, db = Sampler(data / "herald.db-wal"), Sampler(data / "herald.db")
    try:
        ingest.wait_ready(proc, port, "/healthz", log_path)
        with wal, db:
            run = ingest.run_wrk(args, "sqlite", "measured", port, tokens, seconds, proc.pid)
            result.sizes.wal_at_load_end = wal.size()
            result.sizes.db_at_load_end = db.size()
            idle_min = wal.size()
            end = time.monotonic() + args.idle
            while time.monotonic() < end:
                time.sleep(0.05)
                idle_min = min(idle_min, wal.size())
            result.sizes.wal_after_idle = wal.size()
            result.sizes.db_after_idle = db.size()
            result.sizes.wal_idle_min = idle_min
        result.sizes.wal_max = max(wal.largest, result.sizes.wal_at_load_end)
        result.metrics = herald_metrics(port)
        if proc.poll() is not None:
            raise RuntimeError(f"herald exited during the run:\n{ingest.tail(log_path)}")
        result.rps, result.created, result.errors = run.rps, run.created, run.errors
        result.p50_ms, result.p90_ms, result.p99_ms = run.p50_ms, run.p90_ms, run.p99_ms
        result.max_ms, result.other_cpu_pct = run.max_ms, run.other_cpu_pct or 0.0
    finally:
        procs.stop(proc)
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)  # a run's WAL can take gigabytes
    return result


def mib(n: int) -> str:
    return f"{n / MIB:,.1f}"


def print_report(args: argparse.Namespace, results: list[Result]) -> None:
    p = print
    p()
    p(
        f"POST {ingest.PATH}, {args.connections} connections, {args.users} users; "
        f"then {args.idle:g} s idle. Sizes in MiB."
    )
    head = (
        f"{'mode':<8} {'load s':>6} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'errs':>5} {'WAL max':>8} {'WAL end':>8} {'WAL idle':>8} "
        f"{'DB end':>7} {'DB idle':>7} {'other %':>7}"
    )
    p(head)
    p("-" * len(head))
    for r in results:
        if r.error:
            p(f"{r.mode:<8} {r.duration:>6g} NOT MEASURED: {r.error}")
            continue
        s = r.sizes
        p(
            f"{r.mode:<8} {r.duration:>6g} {r.rps:>7,.0f} {r.p50_ms:>7.2f} {r.p90_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.max_ms:>7.1f} {r.errors:>5} {mib(s.wal_max):>8} "
            f"{mib(s.wal_at_load_end):>8} {mib(s.wal_after_idle):>8} {mib(s.db_at_load_end):>7} "
            f"{mib(s.db_after_idle):>7} {r.other_cpu_pct:>7.0f}"
        )
    p("  WAL idle = after the idle period; other % = CPU used by anything else on the machine")
    p("  during the load (% of one core).")
    for r in results:
        if r.metrics:
            p(f"  {r.mode} {r.duration:g} s, Herald's metrics:")
            for series, value in sorted(r.metrics.items()):
                p(f"    {series} {value:,.3f}")
        waits = r.metrics.get('write_wait_seconds_count{reason="checkpoint"}')
        if waits:
            held = r.metrics['write_wait_seconds_sum{reason="checkpoint"}']
            p(f"    writes held by restarts: {waits:.0f} times, {1000 * held / waits:.1f} ms each")
    by = {(r.mode, r.duration): r for r in results if not r.error}
    for seconds in args.durations:
        off, bounded = by.get(("off", seconds)), by.get(("bounded", seconds))
        if off and bounded and off.rps and off.p50_ms and off.p99_ms:
            p(
                f"bounded / off, {seconds:g} s: throughput {bounded.rps / off.rps:.2f}x, "
                f"p50 {bounded.p50_ms / off.p50_ms:.2f}x, p99 {bounded.p99_ms / off.p99_ms:.2f}x, "
                f"max WAL {mib(bounded.sizes.wal_max)} vs {mib(off.sizes.wal_max)} MiB"
            )
    noisy = [r for r in results if r.other_cpu_pct > 15]
    if noisy:
        p("warning: other processes used >15% of a core during some runs; ratios are noisy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--durations", default="25,90", help="seconds of load per run (25,90)")
    ap.add_argument("--idle", type=float, default=15.0, help="idle seconds after the load (15)")
    ap.add_argument("--connections", type=int, default=16, help="concurrent connections (16)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    ap.add_argument("--users", type=int, default=1000, help="distinct users/tokens (1000)")
    ap.add_argument("--limit", type=int, help="HERALD_SQLITE_WAL_LIMIT for the bounded runs")
    ap.add_argument("--modes", default="off,bounded", help="modes to run, in order (off,bounded)")
    ap.add_argument("--install-wrk", action="store_true", help="apt-get install wrk if missing")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args(argv)
    args.durations = [float(d) for d in args.durations.split(",") if d.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - {"off", "bounded"}:
        ap.error("--modes takes off and/or bounded")
    return args


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="herald-wal-"))
    try:
        yield work
    finally:
        if keep:
            print(f"wal: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.wrk = ingest.find_wrk(args.install_wrk)
    procs = ingest.Processes()
    results: list[Result] = []
    with work_dir(args.keep) as work, ingest.signals_stop(procs):
        try:
            for seconds in args.durations:
                for mode in args.modes:
                    print(f"wal: {mode}, {seconds:g} s of load", file=sys.stderr, flush=True)
                    try:
                        results.append(run_one(args, procs, work, mode, seconds))
                    except (RuntimeError, OSError) as exc:
                        results.append(Result(mode, seconds, error=str(exc)))
        except KeyboardInterrupt:
            return 130
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_report(args, results)
    return 0 if all(r.error is None and r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    os.environ.pop("HERALD_SQLITE_WAL_LIMIT", None)
    sys.exit(main())
