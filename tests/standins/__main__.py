"""`python -m tests.standins PROVIDER --port N --dir D`: run one stand-in in its own process.

It makes (or reuses) the CA and server certificate in D, writes the credentials Herald needs
there (APNs: AuthKey_<KEYID>.p8; FCM: fcm-service-account.json), then prints one JSON line —
url, ca_file, control (the control API's base URL) and the provider's credentials — and writes
the same to D/PROVIDER.json. It serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

from tests.standins import PROVIDERS
from tests.standins.apns import ApnsStandIn
from tests.standins.base import StandIn
from tests.standins.fcm import FcmStandIn
from tests.standins.server import serve
from tests.standins.tls import TlsFiles, make_tls
from tests.standins.webpush import WebPushStandIn
from tests.standins.wns import WnsStandIn


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.standins", description=__doc__)
    p.add_argument("provider", choices=sorted(PROVIDERS))
    p.add_argument("--dir", required=True, type=Path, help="for the CA, keys and info file")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--keep",
        type=int,
        default=10000,
        help="records retained (counts stay exact); 0: keep all",
    )
    p.add_argument("--vapid-key", help="webpush: restrict subscriptions to this public key")
    p.add_argument("--team-id", default="HERALDTEAM", help="apns")
    p.add_argument("--topic", default="com.example.herald", help="apns")
    p.add_argument("--environment", default="development", help="apns")
    p.add_argument("--project-id", default="herald-test", help="fcm")
    return p


def build(args: argparse.Namespace, tls: TlsFiles) -> StandIn:
    common = {"host": args.host, "port": args.port, "keep": args.keep or None}
    if args.provider == "webpush":
        return WebPushStandIn(tls, vapid_key=args.vapid_key, **common)
    if args.provider == "apns":
        return ApnsStandIn(
            tls,
            team_id=args.team_id,
            topic=args.topic,
            environment=args.environment,
            **common,
        )
    if args.provider == "fcm":
        return FcmStandIn(tls, project_id=args.project_id, **common)
    return WnsStandIn(tls, **common)


async def run(standin: StandIn, tls: TlsFiles, directory: Path, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.set)

    def ready(url: str) -> None:
        standin.bound(url)
        info = {**standin.info(), **standin.write_credentials(directory)}
        path = directory / f"{standin.provider}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)
        print(json.dumps(info), flush=True)

    await serve(standin, tls, shutdown=shutdown, ready=ready, host=host, port=port)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    tls = make_tls(directory)
    standin = build(args, tls)
    coro = run(standin, tls, directory, args.host, args.port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
