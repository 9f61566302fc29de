"""How long writes take to recover when PostgreSQL goes away under a running Herald.

Two faults, each under steady traffic (8 connections posting back to back, a client backing off
50 ms after a failure, /readyz polled every 100 ms), --rounds times:

    terminate  pg_terminate_backend on every backend of this Herald (found by application_name),
               on the shared server (--postgres-url, or scripts/postgres as root)
    restart    a private PostgreSQL (initdb + pg_ctl as the postgres user, under /tmp) stopped
               with `pg_ctl stop -m fast`, left down --down seconds, started again

Prints per round: posts answered 201 and otherwise, the slowest answer, the 503 window, and for a
restart the recovery: from `pg_ctl start` returning (the server accepts connections) to the last
failed post's answer (writes) and to the first /readyz 200 (readiness). Needs root for the
private cluster.

Usage: .venv/bin/python benchmarks/outage.py [--rounds 3] [--down 3] [--faults terminate,restart]
       [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import ingest  # PostgreSQL: the URL (scripts/postgres as root), a fresh schema per run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pg import application_url, private_cluster, terminate_backends  # noqa: E402
from tests.traffic import Traffic, drive, serve  # noqa: E402


def report(name: str, traffic: Traffic, fault: float, started: float | None) -> None:
    ok = sum(1 for a in traffic.posts if a.status == 201)
    failed = traffic.failed()
    statuses = sorted({a.status for a in failed})
    slowest = max(a.took for a in traffic.posts)
    line = f"{name}: 201 {ok}, failed {len(failed)} {statuses}, slowest answer {slowest:.3f} s"
    if failed:
        first = min(a.at for a in failed) - fault
        last = max(a.at + a.took for a in failed) - fault
        line += f", failures from {first:+.3f} s to {last:+.3f} s after the fault"
    not_ready = [t - fault for t, s in traffic.ready if s != 200]
    if not_ready:
        line += f", /readyz 503 from {min(not_ready):+.3f} to {max(not_ready):+.3f} s"
    if started is not None:
        answered = traffic.last_failure_answered(fault)
        writes = max(0.0, answered - started) if answered is not None else 0.0
        ready = traffic.first_ready(started)
        line += f"; back: writes after {writes:.3f} s"
        line += f", ready after {ready - started:.3f} s" if ready else ", never ready"
    print(line, flush=True)


def terminate_round(admin: str, n: int) -> None:
    schema = f"outage_{uuid.uuid4().hex[:12]}"
    name = f"herald-{schema}"
    ingest.pg(admin, f"CREATE SCHEMA {schema}")
    work = Path(tempfile.mkdtemp(prefix="herald-outage-"))
    try:
        url = application_url(ingest.with_search_path(admin, schema), name)
        at: dict[str, float] = {}

        def fault() -> None:
            at["fault"] = time.monotonic()
            asyncio.run(terminate_backends(admin, name))

        with serve(work, url) as herald:
            traffic = asyncio.run(drive(herald, 5.0, fault))
        report(f"terminate {n}", traffic, at["fault"], None)
    finally:
        ingest.pg(admin, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        shutil.rmtree(work, ignore_errors=True)


def restart_round(down: float, n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="herald-outage-"))
    at: dict[str, float] = {}
    try:
        with contextlib.contextmanager(private_cluster)() as cluster:

            def fault() -> None:
                at["fault"] = time.monotonic()
                cluster.stop("fast")
                time.sleep(down)
                cluster.start()
                at["started"] = time.monotonic()

            url = application_url(cluster.url, f"herald-restart-{n}")
            with serve(work, url) as herald:
                traffic = asyncio.run(drive(herald, down + 5.0, fault))
        report(f"restart {n}", traffic, at["fault"], at["started"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--down", type=float, default=3.0)
    parser.add_argument("--faults", default="terminate,restart")
    parser.add_argument("--postgres-url")
    args = parser.parse_args(argv)
    faults = args.faults.split(",")
    for n in range(1, args.rounds + 1):
        if "terminate" in faults:
            terminate_round(ingest.postgres_url(args), n)
        if "restart" in faults:
            restart_round(args.down, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
