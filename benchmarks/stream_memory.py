"""Memory per idle live stream, side by side: Herald under each WebSocket server layer it could
use, and the minimal fan-out baseline, with the same client harness and the same N in one run.

Candidates (each a server process on 127.0.0.1, started and stopped by this script):

    baseline            fanout_baseline.py (Starlette, a set of sockets per user) under uvicorn
                        as fanout.py runs it (uvicorn's ws="websockets-sansio")
    herald              `herald serve` as configured (server.py)
    herald:<ws>         `herald serve` with uvicorn's `ws=<ws>` instead: websockets-sansio,
                        websockets (the asyncio implementation), wsproto

The devices are raw sockets in this process (the WebSocket handshake written by hand with the
device's delegated token in `Authorization`, the `ready` frame read), so the client costs the
server nothing but a TCP connection and a handshake. Per candidate: warm-up (a few streams
opened and closed, so one-time costs are paid), settle, RSS, `--connections` streams opened
(one `live` subscription per device, two devices per user, as fanout.py), settle, RSS; the
figure is the difference over the number of streams.

`--census` adds a second pass per candidate under tracemalloc (which costs memory itself, so it
is a separate server): what the streams hold per connection, by who allocated it (the innermost
frame outside the standard library: herald, uvicorn, websockets, starlette, ...), and the
GC-tracked objects per connection by type.

Usage: .venv/bin/python benchmarks/stream_memory.py [--connections 10000]
       [--candidates baseline,herald:websockets-sansio,herald:websockets,herald:wsproto,herald]
       [--census]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fanout  # shared helpers: tokens, subscriptions, RSS
import ingest  # shared helpers: processes, ports, app registration
import uvloop
from ingest import HOST

SETTLE_S = 3.0  # Herald's collector freezes once a second; allocators settle
IN_FLIGHT = 128  # handshakes at a time
CENSUS_ENV = "STREAM_MEMORY_CENSUS"  # where the wrapper writes its census on SIGUSR2
WS_ENV = "STREAM_MEMORY_WS"  # uvicorn ws= for `herald serve` (empty: as configured)
TARGET_KB = 20.0

# Runs a module (herald, uvicorn) with, optionally, another uvicorn `ws` for Herald, and a census
# on SIGUSR2: GC-tracked objects by type (frozen ones included) and, under tracemalloc, the
# traced bytes by owner.
WRAPPER = f"""
import collections, gc, json, os, runpy, signal, sys, sysconfig, tracemalloc
ws = os.environ.get("{WS_ENV}")
if ws:
    import herald.server as server
    made = server.config
    def config(*args, **kwargs):
        c = made(*args, **kwargs)
        c.ws = ws
        return c
    server.config = config
stdlib = sysconfig.get_paths()["stdlib"]
def owner(tb):
    for frame in reversed(tb):  # innermost first
        name = frame.filename
        if "site-packages/" in name:
            return name.split("site-packages/")[1].split("/")[0].removesuffix(".py")
        if "/src/herald/" in name:
            return "herald." + name.split("/src/herald/")[1].split("/")[0].removesuffix(".py")
        if "/benchmarks/" in name:
            return "benchmark"
    if len(tb):
        name = tb[0].filename
        return "stdlib." + name.removeprefix(stdlib + "/").split("/")[0].removesuffix(".py")
    return "unknown"
def census(*_):
    gc.unfreeze()  # frozen objects are not in gc.get_objects()
    types = collections.Counter(
        f"{{type(o).__module__}}.{{type(o).__qualname__}}" for o in gc.get_objects()
    )
    gc.freeze()
    owners = collections.Counter()
    if tracemalloc.is_tracing():
        for stat in tracemalloc.take_snapshot().statistics("traceback"):
            owners[owner(stat.traceback)] += stat.size
    path = os.environ["{CENSUS_ENV}"]
    with open(path + ".tmp", "w") as out:
        json.dump({{"types": types, "owners": owners}}, out)
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR2, census)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def log(msg: str) -> None:
    print(f"stream_memory: {msg}", file=sys.stderr, flush=True)


@dataclass
class Result:
    name: str
    connected: int = 0
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    open_s: float = 0.0
    objects: dict[str, float] = field(default_factory=dict)  # per connection, by type
    owners: dict[str, float] = field(default_factory=dict)  # traced bytes per connection
    error: str | None = None

    @property
    def kb(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / self.connected if self.connected else 0.0


@dataclass
class Setup:
    """Herald's data directory, app and tokens, made once and shared by its candidates."""

    data: Path
    store_url: str | None
    tokens: dict[int, str]
    subscriptions: dict[int, str] = field(default_factory=dict)


# -- the devices -------------------------------------------------------------------------------


def handshake(port: int, path: str, token: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{auth}\r\n"
    ).encode()


async def open_one(port: int, request: bytes, gate: asyncio.Semaphore) -> asyncio.StreamWriter:
    async with gate:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head[:300]!r}")
        first = await reader.readexactly(2)  # an unmasked text frame, short: `ready`
        body = await reader.readexactly(first[1] & 0x7F)
        if first[0] != 0x81 or b'"ready"' not in body:
            raise RuntimeError(f"first message is not ready: {first!r} {body[:200]!r}")
        return writer


async def hold(port: int, requests: list[bytes], pid: int, result: Result, census: Path) -> None:
    """Open a stream per request, read the server's RSS (and census) while all are idle, close."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    start = time.monotonic()
    writers = await asyncio.gather(*(open_one(port, r, gate) for r in requests))
    result.open_s = time.monotonic() - start
    result.connected = len(writers)
    await asyncio.sleep(SETTLE_S)
    result.rss_after_kb = fanout.rss_kb(pid)
    if census.name:
        after = await asyncio.to_thread(take_census, pid, census)
        result.objects = after["types"]
        result.owners = after["owners"]
    for w in writers:
        w.close()


def take_census(pid: int, path: Path) -> dict[str, dict[str, float]]:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no census from pid {pid}")
        time.sleep(0.1)
    return dict(json.loads(path.read_text()))


# -- candidates --------------------------------------------------------------------------------


def start_herald(
    procs: ingest.Processes, setup: Setup, ws: str, work: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = ingest.free_port()
    argv = [sys.executable, "-c", WRAPPER, "herald", "serve", "--data", str(setup.data)]
    argv += ["--port", str(port)]
    if setup.store_url:
        argv += ["--store", setup.store_url]
    log_path = work / f"herald-{ws or 'configured'}.log"
    proc = procs.start(argv, env | {WS_ENV: ws}, log_path)
    ingest.wait_ready(proc, port, "/healthz", log_path)
    return proc, port


def start_baseline(
    procs: ingest.Processes, work: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = ingest.free_port()
    flags = ["--ws-ping-interval", "0", "--ws-per-message-deflate", "false"]
    argv = [
        sys.executable,
        "-c",
        WRAPPER,
        "uvicorn",
        *ingest.uvicorn_flags("fanout_baseline:app", port),
    ]
    log_path = work / "baseline.log"
    proc = procs.start([*argv, *flags], env, log_path)
    ingest.wait_ready(proc, port, "/healthz", log_path)
    return proc, port


def paths(name: str, setup: Setup, n: int) -> list[tuple[str, str | None]]:
    """(path, token) of each device; -1 and -2 are the warm-up devices."""
    devices = [-1, -2, *range(n)]
    if name == "baseline":
        return [(f"/stream/{fanout.user_name(d // 2)}", None) for d in devices]
    stream = "/beta/me/notificationSubscriptions/{}/stream"
    return [
        (stream.format(setup.subscriptions[d]), setup.tokens[d // 2 if d >= 0 else -1])
        for d in devices
    ]


def measure(
    name: str,
    args: argparse.Namespace,
    procs: ingest.Processes,
    setup: Setup,
    work: Path,
    traced: bool,
) -> Result:
    result = Result(name)
    env = ingest.server_env(fanout.EXTRA_LIMITS_ENV)
    census = work / f"{name}.census" if traced else Path("")
    if traced:
        env |= {"PYTHONTRACEMALLOC": "8", CENSUS_ENV: str(census)}
    if name == "baseline":
        proc, port = start_baseline(procs, work, env)
    else:
        proc, port = start_herald(procs, setup, name.partition(":")[2], work, env)
    try:
        fanout.check_server_nofile(proc.pid, args.connections)
        devices = paths(name, setup, args.connections)
        requests = [handshake(port, path, token) for path, token in devices]
        warm = Result(name)
        uvloop.run(hold(port, requests[:2], proc.pid, warm, Path("")))  # one-time costs
        time.sleep(SETTLE_S)
        result.rss_before_kb = fanout.rss_kb(proc.pid)
        before: dict[str, dict[str, float]] = {}
        if traced:
            before = take_census(proc.pid, census)
        uvloop.run(hold(port, requests[2:], proc.pid, result, census))
        if traced:
            n = result.connected
            result.objects = per(result.objects, before["types"], n)
            result.owners = per(result.owners, before["owners"], n)
        if proc.poll() is not None:
            raise RuntimeError("the server exited during the run")
    except Exception as exc:  # reported in the table; the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        procs.stop(proc)
    return result


def per(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    keys = set(after) | set(before)
    return {k: (after.get(k, 0) - before.get(k, 0)) / n for k in keys}


def prepare(args: argparse.Namespace, procs: ingest.Processes, work: Path) -> Setup:
    """One data directory for every Herald candidate: app, tokens, a subscription per device."""
    data = work / "herald"
    data.mkdir()
    env = ingest.server_env(fanout.EXTRA_LIMITS_ENV)
    client_id = ingest.register_app(data, None, env)
    port = ingest.free_port()
    log("herald: minting tokens")
    _, tokens = fanout.mint_tokens(data, port, client_id, args.connections // 2)
    setup = Setup(data, None, tokens)
    argv = [
        fanout.sys.executable,
        "-m",
        "herald",
        "serve",
        "--data",
        str(data),
        "--port",
        str(port),
    ]
    proc = procs.start(argv, env, work / "prepare.log")
    try:
        ingest.wait_ready(proc, port, "/healthz", work / "prepare.log")
        log(f"herald: creating {args.connections:,} subscriptions")
        setup.subscriptions = asyncio.run(
            fanout.subscribe_all(f"http://{HOST}:{port}", tokens, args.connections)
        )
    finally:
        procs.stop(proc)
    return setup


# -- report ------------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: list[Result], censuses: list[Result]) -> None:
    p = print
    p()
    p(f"Memory per idle live stream: {args.connections:,} WebSocket streams per candidate")
    head = f"{'candidate':<28} {'RSS before':>11} {'RSS after':>10} {'KB/conn':>8} {'/baseline':>9}"
    p(head)
    p("-" * len(head))
    base = next((r for r in results if r.name == "baseline" and not r.error), None)
    for r in results:
        if r.error:
            p(f"{r.name:<28} NOT MEASURED: {r.error[:200]}")
            continue
        ratio = f"{r.kb / base.kb:.2f}x" if base and base.kb else "-"
        p(
            f"{r.name:<28} {r.rss_before_kb / 1024:>8.1f} MiB {r.rss_after_kb / 1024:>6.1f} MiB "
            f"{r.kb:>8.1f} {ratio:>9}"
        )
    for r in censuses:
        p()
        if r.error:
            p(f"census {r.name}: NOT MEASURED: {r.error[:200]}")
            continue
        traced = sum(r.owners.values())
        p(f"census {r.name} (tracemalloc): {traced / 1024:.1f} KB traced per connection, by owner:")
        for owner, size in sorted(r.owners.items(), key=lambda kv: -kv[1])[:14]:
            if abs(size) >= 16:
                p(f"  {owner:<40} {size:>8.0f} B")
        objects = sum(r.objects.values())
        p(f"  GC-tracked objects per connection: {objects:.1f}; by type:")
        for kind, count in sorted(r.objects.items(), key=lambda kv: -kv[1])[:25]:
            if count >= 0.05:
                p(f"    {kind:<56} {count:>6.2f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000, help="streams per candidate")
    ap.add_argument(
        "--candidates",
        default="baseline,herald:websockets-sansio,herald:websockets,herald:wsproto,herald",
        help="baseline, herald (as configured), herald:<uvicorn ws>",
    )
    ap.add_argument("--census", action="store_true", help="also a traced pass per candidate")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if args.connections < 2 or args.connections % 2:
        ap.error("--connections must be an even number >= 2")
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if fanout.raise_nofile() < args.connections + 100:
        sys.exit("stream_memory: the open-files hard limit is too low")
    procs = ingest.Processes()
    work = Path(tempfile.mkdtemp(prefix="herald-stream-memory-"))
    results: list[Result] = []
    censuses: list[Result] = []
    try:
        with ingest.signals_stop(procs):
            setup = prepare(args, procs, work)
            for name in args.candidates:
                log(f"{name}: measuring")
                results.append(measure(name, args, procs, setup, work, traced=False))
                log(f"{name}: {results[-1].kb:.1f} KB per connection {results[-1].error or ''}")
            if args.census:
                for name in args.candidates:
                    log(f"{name}: census")
                    censuses.append(measure(name, args, procs, setup, work, traced=True))
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(args, results, censuses)
    ok = [r for r in results if r.name != "baseline" and not r.error and 0 < r.kb <= TARGET_KB]
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
