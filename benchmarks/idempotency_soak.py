"""SIGKILL soak with an Idempotency-Key on every write, on SQLite and PostgreSQL.

Posts continuously from --workers connections (each key's body is the key itself, no
appNotificationId, so a key written twice is two notifications), SIGKILLs `herald serve` after a
random 0.3-1.5 s, --kills times, restarting it each time; every key that got no answer (the
connection died, or a 503) is retried with the same key and body, as a client must. At the end,
on a server that stays up, every unanswered key is retried until answered, then every
notification is listed and counted per key.

Prints per store: kills, keys, requests, keys acknowledged (answered 201/200), keys retried,
notifications stored, duplicates (keys with more than one notification), lost (acknowledged keys
with none), mismatched (acknowledged keys whose answer names another notification than the one
stored) and non-2xx answers by status. Exit status 0 when both are clean: 0 duplicates, 0 lost,
0 mismatched, nothing but 503 among the non-2xx answers.

Usage: .venv/bin/python benchmarks/idempotency_soak.py [--stores sqlite,postgres] [--kills 20]
       [--workers 32] [--users 8] [--seed 1] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import ingest  # PostgreSQL: the URL (scripts/postgres as root), a fresh schema per run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.soak import Result, Soak  # noqa: E402


def soak(store: str, args: argparse.Namespace) -> Result:
    work = Path(tempfile.mkdtemp(prefix=f"herald-soak-{store}-"))
    schema = f"soak_{uuid.uuid4().hex[:12]}"
    admin = ingest.postgres_url(args) if store == "postgres" else None
    try:
        store_url = None
        if admin is not None:
            ingest.pg(admin, f"CREATE SCHEMA {schema}")
            store_url = ingest.with_search_path(admin, schema)
        runner = Soak(work, store_url, users=args.users, workers=args.workers, seed=args.seed)
        return runner.run(args.kills)
    finally:
        if admin is not None:
            ingest.pg(admin, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--postgres-url")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args(argv)
    clean = True
    for store in args.stores.split(","):
        result = soak(store, args)
        print(f"{store}: {result.summary()}", flush=True)
        clean = clean and result.clean
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
