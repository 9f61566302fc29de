"""The HTTP/1.1 push client alone: CPU per request of Herald's client
(`outbound/providers/http1.py`) against aiohttp's client session configured as Herald configured it
until issue 15, in the same run, on the same server.

    baseline  aiohttp.ClientSession (no cookie jar, no decompression, a total timeout, the answer
              read in chunks up to 16 KiB): Herald's HTTP/1.1 client before `http1.py`
    herald    herald.outbound.providers.clients.exchange over `Http1`

Both POST a Web Push-shaped request (a 464-byte body, a ~400-byte VAPID Authorization header
and the other Web Push headers) over TLS to one server: `benchmarks/bare.py` on uvicorn with the
flags `herald serve` uses, in its own process, a certificate of the push stand-ins' CA. Each
client runs in this process on uvloop with --concurrency requests in flight, --requests after a
warm-up of the same size, and is measured --rounds times, alternating, so a slow phase of the
machine falls on both. Reported: this process's CPU per request (the client's cost: the
server's is the same for both) and requests/s, best and median over the rounds, and the ratio.

Usage: .venv/bin/python benchmarks/pushclient.py [--requests 20000] [--concurrency 1,64]
       [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import ingest  # shared helpers: ports, uvicorn flags, readiness
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from herald.outbound.providers.clients import Http1, exchange, tls_context
from tests.standins.tls import make_tls

BODY = os.urandom(464)
HEADERS = {
    "TTL": "2419200",
    "Urgency": "normal",
    "Topic": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "Content-Encoding": "aes128gcm",
    "Content-Type": "application/octet-stream",
    "Authorization": "vapid t=" + "e" * 300 + ", k=" + "B" * 87,
}
MAX_ANSWER = 16_384

Post = Callable[[], Awaitable[int]]


def aiohttp_post(url: str, ca_file: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls_context(ca_file), limit=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=10.0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        headers={"Accept-Encoding": "identity"},
    )

    async def post() -> int:
        async with session.request(
            "POST", url, data=BODY, headers=HEADERS, allow_redirects=False
        ) as answer:
            body = bytearray()
            async for chunk in answer.content.iter_chunked(MAX_ANSWER):
                body += chunk
                if len(body) >= MAX_ANSWER:
                    break
            return answer.status

    return post, session.close


def herald_post(url: str, ca_file: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    client = Http1(tls_context(ca_file), 10.0)

    async def post() -> int:
        return (await exchange(client, "POST", url, content=BODY, headers=HEADERS)).status_code

    return post, client.aclose


async def measure(
    post: Post, requests: int, concurrency: int, server: int
) -> tuple[float, float, float]:
    """(this process's CPU µs per request, requests/s, the server's CPU µs per request) for
    `requests` POSTs, `concurrency` in flight."""

    async def burst() -> None:
        left = iter(range(requests))

        async def worker() -> None:
            for _ in left:
                status = await post()
                assert status == 201, status

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    await burst()  # warm-up: connections opened, caches filled
    cpu, wall, served = time.process_time(), time.perf_counter(), ingest.proc_cpu_seconds(server)
    await burst()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    served = ingest.proc_cpu_seconds(server) - served
    return cpu / requests * 1e6, requests / wall, served / requests * 1e6


async def once(
    make: Callable[[str, str], tuple[Post, Callable[[], Awaitable[None]]]],
    url: str,
    ca_file: str,
    requests: int,
    concurrency: int,
    server: int,
) -> tuple[float, float, float]:
    post, close = make(url, ca_file)
    try:
        return await measure(post, requests, concurrency, server)
    finally:
        await close()


def run(
    args: argparse.Namespace, url: str, ca_file: str, server: int
) -> dict[str, dict[str, list[float]]]:
    made = {"baseline": aiohttp_post, "herald": herald_post}
    results: dict[str, dict[str, list[float]]] = {}
    for concurrency in args.concurrency:
        for _ in range(args.rounds):
            for name, make in made.items():
                measured = once(make, url, ca_file, args.requests, concurrency, server)
                cpu, rate, served = uvloop.run(measured)
                row = results.setdefault(
                    f"{name} @{concurrency}", {"cpu_us": [], "rps": [], "server_us": []}
                )
                row["cpu_us"].append(cpu)
                row["rps"].append(rate)
                row["server_us"].append(served)
                log(
                    f"{name} @{concurrency}: {cpu:.1f} µs CPU per request, {rate:,.0f}/s,"
                    f" server {served:.1f} µs"
                )
    return results


def report(args: argparse.Namespace, results: dict[str, dict[str, list[float]]]) -> None:
    print(
        f"{'client':<22}{'µs CPU/request best':>21}{'median':>9}{'req/s median':>14}"
        f"{'ratio':>8}{'server µs/request':>19}"
    )
    for concurrency in args.concurrency:
        base = statistics.median(results[f"baseline @{concurrency}"]["cpu_us"])
        for name in ("baseline", "herald"):
            row = results[f"{name} @{concurrency}"]
            cpu = statistics.median(row["cpu_us"])
            print(
                f"{name + ' @' + str(concurrency):<22}{min(row['cpu_us']):>21.1f}{cpu:>9.1f}"
                f"{statistics.median(row['rps']):>14,.0f}{cpu / base:>7.2f}x"
                f"{statistics.median(row['server_us']):>19.1f}"
            )
    print(
        "ratio: median CPU per request against the baseline's at the same concurrency;"
        " server: the TLS server's CPU per request (median), what each client costs it"
    )


def log(msg: str) -> None:
    print(f"pushclient: {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000, help="POSTs per measurement (20000)")
    ap.add_argument("--concurrency", default="1,64", help="requests in flight, a list (1,64)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each client (3)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="herald-pushclient-") as work:
        tls = make_tls(Path(work))
        port = ingest.free_port()
        argv_ = [sys.executable, "-m", "uvicorn", *ingest.uvicorn_flags("bare:app", port)]
        argv_ += ["--ssl-certfile", str(tls.cert_file), "--ssl-keyfile", str(tls.key_file)]
        log_file = Path(work) / "server.log"
        with log_file.open("wb") as out:
            server = subprocess.Popen(argv_, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_tls_ready(port, str(tls.ca_file))
            url = f"https://{ingest.HOST}:{port}/push/abc"
            results = run(args, url, str(tls.ca_file), server.pid)
        finally:
            server.terminate()
            server.wait(10)
    if args.json:
        print(json.dumps(results))
    else:
        report(args, results)
    return 0


def wait_tls_ready(port: int, ca_file: str) -> None:
    import httpx

    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.post(f"https://{ingest.HOST}:{port}/", verify=tls_context(ca_file), content=b"")
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
