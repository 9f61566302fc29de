"""Live fan-out benchmark: connected devices, an app server posting to random users, Herald vs a
minimal WebSocket fan-out server with no storage, in the same run.

For each target, one server process on 127.0.0.1, started and stopped by this script:

    baseline `fanout_baseline.py` (Starlette, a dict of sockets) under uvicorn with the flags
             `herald serve` uses
    herald   `herald serve --data DIR --port P` (embedded SQLite, or --store postgres)

`--devices` WebSocket clients (2 per user) connect gradually from `--workers` separate processes
and wait for `ready`; then the script (the "app server") posts `--rate` notifications/s to random
users for `--duration` s, open loop, each with a unique appNotificationId. Each device records when
it receives each `created` message, so the script reports post-to-device latency (from just
before the POST is sent until the device has the message), missing, duplicate and misrouted
deliveries, and the server's memory per idle connection (RSS after the connections are open and
idle minus RSS before them, divided by their number).

Herald is driven as a real deployment: an app registered with `herald app create`, RS256 tokens
from the server's own issuer key (a delegated token per user for its devices, an app-only token for
the poster), one `live` subscription per device, streams authenticated with the Authorization
header, rate limits on but raised so they never throttle, the 201 sent after the durable commit.

With 10,000 connections a full cyclic-GC collection can stop a server for most of a second. Each
server runs under a few lines that record every collection (generation, start, duration; a
`gc.callbacks` hook), and the report gives them by phase: while devices connect, while posting,
and over the server's whole life. Halfway through posting each server is made to run a full
(generation 2) collection, so the worst case always falls inside the window; `--no-full-gc` leaves
it to chance (see benchmarks/README.md).

With `--nodes N` (N > 1, PostgreSQL) each target runs as N server processes joined by a private
redis-server started here: Herald as N `herald serve` on one PostgreSQL with the Redis broker,
the baseline as N processes that relay every POST through one Redis channel. Device d connects to
node d % N (a user's two devices land on different nodes), the app server posts to node 0, so
latency is reported apart for devices on the posting node (same-node) and on the others
(cross-node), with CPU per delivered message for the servers, Redis and PostgreSQL, and GC pauses
of every node.

Usage: .venv/bin/python benchmarks/fanout.py [--quick] [--devices 10000] [--rate 1000]
       [--duration 20] [--store sqlite|postgres] [--targets baseline,herald] [--no-full-gc]
       [--nodes 2]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import ingest  # shared helpers: processes, ports, /proc CPU, app registration, PostgreSQL
import uvloop
from ingest import HOST, HOST_NAME

HERE = Path(__file__).resolve().parent
TARGET_P99_MS = 10.0
TARGET_MAX_MS = 50.0
TARGET_KB_PER_CONN = 20.0
TOKEN_TTL = 3 * 3600
WARMUP_USER = "fanout-warmup"
CONNECT_TIMEOUT = 30.0
IN_FLIGHT_HANDSHAKES = 64  # per worker: opening stays gradual even when the server is slow
POST_CONNECTIONS = 64  # the poster's keep-alive pool; a POST waiting for one is still timed
POST_TIMEOUT = 30.0  # after the last POST is sent, for the ones still unanswered
SETTLE_S = 3.0  # idle time before the "after" memory reading
NOISY_OTHER_PCT = 15.0
# Every server runs its own module (uvicorn, herald) under this wrapper, which records every
# cyclic-GC collection (generation, CLOCK_MONOTONIC start, duration) in memory and writes them to
# $FANOUT_GC_FILE on SIGUSR2. SIGRTMIN makes it run a full collection now (reported as generation
# "2f"); SIGUSR1 makes it call gc.freeze() (--gc-freeze, an experiment).
GC_FILE_ENV = "FANOUT_GC_FILE"
GC_FORCED = 3  # generation recorded for the full collection the harness asks for
GC_WRAPPER = f"""
import array, gc, os, runpy, signal, sys, time
gens, starts, lengths = array.array("q"), array.array("q"), array.array("q")
began, forced = [0], [False]
def pause(phase, info):
    if phase == "start":
        began[0] = time.monotonic_ns()
    else:
        gens.append({GC_FORCED} if forced[0] else info["generation"])
        starts.append(began[0])
        lengths.append(time.monotonic_ns() - began[0])
def full(*_):
    forced[0] = True
    try:
        gc.collect()
    finally:
        forced[0] = False
def dump(*_):
    path = os.environ["{GC_FILE_ENV}"]
    with open(path + ".tmp", "wb") as out:
        for column in (gens, starts, lengths):
            out.write(column.tobytes())
    os.replace(path + ".tmp", path)
gc.callbacks.insert(0, pause)
signal.signal(signal.SIGUSR1, lambda *_: gc.freeze())
signal.signal(signal.SIGUSR2, dump)
signal.signal(signal.SIGRTMIN, full)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
GC_REPORT_MS = 5.0  # pauses at least this long are listed one by one
GC_TARGET_MS = 20.0  # no pause longer than this while posting
NODES_GC_TARGET_MS = 50.0  # --nodes: no node's pause longer than this while posting
CROSS_NODE_P99_FACTOR = 2.0  # --nodes: cross-node p99 at most this times same-node p99
EXTRA_LIMITS_ENV = {
    "HERALD_TOKEN_RATE": "1000000000",
    "HERALD_TOKEN_BURST": "1000000000",
    # Every device connects from 127.0.0.1: its handshakes in flight must not count as one
    # client's pending connections (a stalled server queues them).
    "HERALD_MAX_PENDING_PER_ADDRESS": "100000",
}


def log(msg: str) -> None:
    print(f"fanout: {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """Soft open-files limit up to the hard one (10,000 sockets need more than 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def nofile_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


def user_name(u: int) -> str:
    return f"fanout-user-{u:05d}"


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(p / 100 * len(sorted_xs)))]


# -- device workers (separate processes) -----------------------------------------------------------


@dataclass(frozen=True)
class Device:
    index: int
    user: int  # -1: the warm-up user
    url: str
    token: str | None  # Herald: the user's delegated token, sent as Authorization


class DeviceWorker:
    """Holds its share of the devices' WebSockets and records every `created` message."""

    def __init__(self, devices: list[Device], open_rate: float) -> None:
        self.devices = devices
        self.open_rate = open_rate
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.failures: Counter[str] = Counter()
        # One row per `created` message: which notification, which device, when (monotonic ns).
        self.seqs = array.array("q")
        self.devs = array.array("q")
        self.times = array.array("q")
        self.unique: set[tuple[int, int]] = set()
        self.other: Counter[str] = Counter()  # other message types (keepalive, closing, …)
        self.closes: Counter[str] = Counter()  # connections that ended, by close code

    async def open_half(self, session: aiohttp.ClientSession, half: int) -> None:
        """Connect the first or the second half of this worker's devices."""
        middle = len(self.devices) // 2
        devices = self.devices[:middle] if half == 1 else self.devices[middle:]
        gate = asyncio.Semaphore(IN_FLIGHT_HANDSHAKES)
        start = time.monotonic()
        tasks = []
        for i, device in enumerate(devices):
            delay = start + i / self.open_rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            tasks.append(asyncio.create_task(self.open_one(session, device, gate)))
        await asyncio.gather(*tasks)

    async def open_one(
        self, session: aiohttp.ClientSession, device: Device, gate: asyncio.Semaphore
    ) -> None:
        headers = {"Authorization": f"Bearer {device.token}"} if device.token else {}
        try:
            ws = await session.ws_connect(
                device.url,
                headers=headers,
                autoping=True,  # answer uvicorn's keep-alive pings
                heartbeat=None,
                compress=0,  # no permessage-deflate offer: see README (memory)
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            )
            first = await asyncio.wait_for(ws.receive(), CONNECT_TIMEOUT)
            if (
                first.type is not aiohttp.WSMsgType.TEXT
                or json.loads(first.data)["type"] != "ready"
            ):
                self.failures[f"first message not ready: {str(first.data)[:120]}"] += 1
                await ws.close()
                return
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.failures[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
            return
        finally:
            gate.release()
        self.sockets.append(ws)
        self.readers.append(asyncio.create_task(self.read(device, ws)))

    async def read(self, device: Device, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            now = time.monotonic_ns()  # first thing: the device has the message now
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.closes[f"{msg.type.name} {ws.close_code}"] += 1
                return
            self.on_text(device, msg.data, now)

    def on_text(self, device: Device, data: str, now: int) -> None:
        message = json.loads(data)
        kind = message.get("type")
        if kind != "created":
            self.other[str(kind)] += 1
            return
        app_id = str(message["notification"]["appNotificationId"])
        seq = int(app_id.rsplit("-", 1)[1])
        self.seqs.append(seq)
        self.devs.append(device.index)
        self.times.append(now)
        self.unique.add((seq, device.index))

    async def close_all(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


def worker_main(conn: Connection, devices: list[Device], open_rate: float) -> None:
    raise_nofile()
    uvloop.run(_worker(conn, devices, open_rate))


STALL_SLEEP_S = 0.002  # the stall probe's nap
STALL_MS = 5.0  # an overslept nap longer than this is recorded


def stall_probe_main(conn: Connection) -> None:
    """Nap for STALL_SLEEP_S again and again until told to stop, then send back each nap
    overslept by more than STALL_MS (start ns, ms). A process that mostly sleeps is run as soon
    as it wakes while the other processes merely compete for the cores (the scheduler favours
    sleepers), so what it records is the machine stopping everything: the virtual machine's
    CPUs held up by its host, which no process here can see in its own CPU time."""
    stalls: list[tuple[int, float]] = []
    conn.send("ready")
    while not conn.poll():
        began = time.monotonic_ns()
        time.sleep(STALL_SLEEP_S)
        over = (time.monotonic_ns() - began) / 1e6 - STALL_SLEEP_S * 1e3
        if over > STALL_MS:
            stalls.append((began, over))
    conn.recv()
    conn.send(stalls)


class StallProbe:
    """`stall_probe_main` in a process of its own. It is started, and running, before the
    posting window: a spawned interpreter's start-up (imports, ~0.1-0.3 s of CPU) at the first
    posts held them back (up to 80 ms of schedule lag at 19,000 devices)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=stall_probe_main, args=(child,), daemon=True)
        self.proc.start()
        self.conn.recv()  # "ready": started and napping

    def stop(self, since: int) -> list[tuple[int, float]]:
        """The stalls from `since` (monotonic ns) on."""
        self.conn.send("stop")
        stalls: list[tuple[int, float]] = self.conn.recv()
        self.proc.join(5)
        return [(began, ms) for began, ms in stalls if began >= since]


class Pauses:
    """A device worker's own cyclic-GC collections (start ns, ms): the devices are the
    measuring instrument, and a collection walking 5,000-10,000 client sockets' objects stops
    the clock that times their messages for as long as it runs."""

    def __init__(self) -> None:
        self.began = 0
        self.record: list[tuple[int, float]] = []
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.began = time.monotonic_ns()
        else:
            self.record.append((self.began, (time.monotonic_ns() - self.began) / 1e6))


async def _worker(conn: Connection, devices: list[Device], open_rate: float) -> None:
    """Commands from the parent, one at a time over the pipe: clock, open-1 and open-2 (each
    connects half of the devices), count, gc (the worker's own collections), collect.

    Once all of its devices are connected, the worker moves what is alive out of the cyclic
    collector's reach (`gc.freeze()`) and turns the collector off, so that its own collections
    do not show up as late deliveries (with the freeze alone, a worker of 9,500 devices still
    paused 52-73 ms while posting); any collection it still makes is reported (`gc`)."""
    loop = asyncio.get_running_loop()
    pauses = Pauses()
    worker = DeviceWorker(devices, open_rate)
    rss0 = rss_kb(os.getpid())
    connector = aiohttp.TCPConnector(limit=0)  # WebSockets hold their connection for good
    async with aiohttp.ClientSession(connector=connector) as session:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "clock":
                conn.send(time.monotonic_ns())
            elif command in ("open-1", "open-2"):
                await worker.open_half(session, int(command[-1]))
                await asyncio.sleep(1.0)
                if command == "open-2":
                    gc.collect()
                    gc.freeze()
                    gc.disable()  # what a run allocates after this is small and freed at exit
                conn.send((len(worker.sockets), dict(worker.failures), rss_kb(os.getpid()) - rss0))
            elif command == "count":
                conn.send(len(worker.unique))
            elif command == "gc":
                conn.send(pauses.record)
            elif command == "collect":
                conn.send(
                    (
                        worker.seqs.tobytes(),
                        worker.devs.tobytes(),
                        worker.times.tobytes(),
                        dict(worker.other),
                        dict(worker.closes),
                    )
                )
                await worker.close_all()
                return


class Workers:
    """The device worker processes of one target."""

    def __init__(self, devices: list[Device], count: int, open_rate: float) -> None:
        ctx = mp.get_context("spawn")  # a clean interpreter, not a fork of this one
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.collected = False
        for w in range(count):
            parent, child = ctx.Pipe()
            share = devices[w::count]  # a user's two devices land in different workers
            proc = ctx.Process(
                target=worker_main, args=(child, share, open_rate / count), daemon=True
            )
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, command: str) -> list[Any]:
        for conn in self.conns:
            conn.send(command)
        replies = [conn.recv() for conn in self.conns]
        self.collected = command == "collect"  # the workers close their sockets and exit
        return replies

    def check_clock(self) -> None:
        """CLOCK_MONOTONIC is system-wide on Linux: a worker's reading must fall in our window."""
        for conn in self.conns:
            before = time.monotonic_ns()
            conn.send("clock")
            theirs = conn.recv()
            after = time.monotonic_ns()
            if not before <= theirs <= after:
                raise RuntimeError(f"monotonic clocks disagree: {before} <= {theirs} <= {after}")

    def cpu_seconds(self) -> float:
        return sum(ingest.proc_cpu_seconds(p.pid) for p in self.procs if p.is_alive())

    def stop(self) -> None:
        for proc in self.procs:
            if self.collected:
                proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- the app server: open-loop poster --------------------------------------------------------------


@dataclass
class Posts:
    users: list[int] = field(default_factory=list)
    sent_ns: list[int] = field(default_factory=list)  # just before the POST was handed over
    ack_ns: list[int] = field(default_factory=list)
    status: list[int] = field(default_factory=list)  # 0 = no response
    lag_ns: list[int] = field(default_factory=list)  # send time minus scheduled time
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0


def notification_body(seq: int, run_id: str) -> bytes:
    return json.dumps(
        {
            "targetHostName": HOST_NAME,
            "appNotificationId": f"fanout-{seq}",
            "payload": {
                "rawContent": f"{run_id}:{seq}",
                "visualContent": {"title": "Fan-out", "body": f"Notification {seq} of {run_id}"},
            },
            "priority": "High",
            "displayTimeToLive": "60",
        }
    ).encode()


@dataclass(frozen=True)
class Target:
    """How to reach one server: device URLs, the poster's URL and token."""

    name: str
    base: str
    stream_url: dict[int, str]  # device index -> WebSocket URL
    post_path: str  # format string with {user}
    app_token: str | None
    user_tokens: dict[int, str]  # user -> delegated token (Herald)
    # The pids of this server's own PostgreSQL backends (found by their application_name): the
    # PostgreSQL server may be shared, and other sessions' work is not this server's cost.
    db_backends: Callable[[], list[int]] | None = None

    def post_headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.app_token:
            headers["Authorization"] = f"Bearer {self.app_token}"
        return headers


class PostConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the poster, one request at a time; the response is
    parsed by httptools (uvicorn's parser). aiohttp's client took ~0.33 ms of CPU per POST, a third
    of a core at 1,000 posts/s taken from the server under test; this takes a fraction of that."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body = bytearray()
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ConnectionError(f"bad response: {exc}"))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        body = bytes(self.body)
        self.body.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError("connection closed before the response"))

    def fail(self, exc: Exception) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and self.waiter is None
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        if self.transport.is_closing():
            self.fail(ConnectionError("connection closed before the request"))
        else:
            self.transport.write(data)
        return waiter


class PostPool:
    """Up to `limit` keep-alive connections to one server; a POST waits for a free one."""

    def __init__(self, base: str, limit: int) -> None:
        url = urllib.parse.urlsplit(base)
        self.netloc = url.netloc  # the Host header
        self.host, self.port = url.hostname or HOST, url.port or 80
        self.limit = limit
        self.open = 0
        self.idle: collections.deque[PostConnection] = collections.deque()
        self.waiting: collections.deque[asyncio.Future[PostConnection]] = collections.deque()

    async def fill(self) -> None:
        """Open every connection before the clock starts, as an app server's pool would be:
        opened lazily, the first 64 POSTs of a run each waited for a connect and the server's
        accept (a first 50-120 ms of late posts and answers, half of p99's 1 % at 19,000
        devices)."""
        made = await asyncio.gather(*(self._connect() for _ in range(self.limit - self.open)))
        self.open += len(made)
        self.idle.extend(made)

    async def _connect(self) -> PostConnection:
        _, conn = await asyncio.get_running_loop().create_connection(
            PostConnection, self.host, self.port
        )
        return conn

    async def take(self) -> PostConnection:
        # Oldest first: each connection stays busy enough not to meet the server's idle timeout.
        while self.idle:
            conn = self.idle.popleft()
            if conn.reusable:
                return conn
            self.open -= 1  # closed while idle (connection_lost)
        if self.open < self.limit:
            self.open += 1
            try:
                return await self._connect()
            except BaseException:
                self.open -= 1
                raise
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        return await waiter

    def give(self, conn: PostConnection) -> None:
        if conn.waiter is not None:  # given back unanswered (cancelled): not reusable
            conn.waiter.cancel()
            conn.fail(ConnectionError("abandoned"))
        if not conn.reusable:
            self.open -= 1
            if self.waiting:  # its place goes to a waiting POST, on a new connection
                self.open += 1
                asyncio.ensure_future(self._reopen(self.waiting.popleft()))
            return
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    async def _reopen(self, waiter: asyncio.Future[PostConnection]) -> None:
        try:
            conn = await self._connect()
        except OSError as exc:
            self.open -= 1
            waiter.set_exception(exc)
            return
        waiter.set_result(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def post_request(target: Target, user: int, body: bytes, host: str) -> bytes:
    """The whole POST as bytes, written in one call."""
    path = target.post_path.format(user=user_name(user))
    fields = "".join(f"{k}: {v}\r\n" for k, v in target.post_headers().items())
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{fields}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def post_one(pool: PostPool, posts: Posts, seq: int, request: bytes, due: int) -> None:
    sent = time.monotonic_ns()
    posts.sent_ns[seq] = sent
    posts.lag_ns[seq] = sent - due
    try:
        conn = await pool.take()
        try:
            status, text = await conn.request(request)
        finally:
            pool.give(conn)
        posts.status[seq] = status
        if status not in (200, 201):
            posts.errors[f"{status}: {text[:200].decode(errors='replace')}"] += 1
    except OSError as exc:  # ConnectionError included
        posts.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
    finally:  # cancelled (unanswered at the end) included
        posts.ack_ns[seq] = time.monotonic_ns()


async def post_all(target: Target, users: int, rate: float, duration: float, seed: int) -> Posts:
    """Open loop: POST n is due at start + n/rate, whether or not earlier ones were answered."""
    rng = random.Random(seed)
    count = int(rate * duration)
    posts = Posts(
        users=[rng.randrange(users) for _ in range(count)],
        sent_ns=[0] * count,
        ack_ns=[0] * count,
        status=[0] * count,
        lag_ns=[0] * count,
    )
    run_id = uuid.uuid4().hex[:12]
    pool = PostPool(target.base, POST_CONNECTIONS)
    try:
        await pool.fill()
        start = time.monotonic_ns() + 50_000_000
        tasks = []
        for seq in range(count):
            due = start + int(seq * 1e9 / rate)
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            body = notification_body(seq, run_id)
            request = post_request(target, posts.users[seq], body, pool.netloc)
            tasks.append(asyncio.create_task(post_one(pool, posts, seq, request, due)))
        # Only those still in flight: gathering all of them first took ~100 ms of the loop,
        # before the last post could go (it showed as the run's "max schedule lag").
        late = [task for task in tasks if not task.done()]
        if late:
            _, unanswered = await asyncio.wait(late, timeout=POST_TIMEOUT)
            for task in unanswered:  # counted as not acknowledged (status 0)
                task.cancel()
            if unanswered:
                posts.errors[f"no response within {POST_TIMEOUT:.0f} s"] += len(unanswered)
        posts.elapsed_s = (max(posts.sent_ns) - min(posts.sent_ns)) / 1e9 if count else 0.0
    finally:
        pool.close()
    return posts


# -- Herald setup: app, tokens, subscriptions ------------------------------------------------------


def mint_tokens(data: Path, port: int, client_id: str, users: int) -> tuple[str, dict[int, str]]:
    """The app-only token and one delegated token per user, from the server's own issuer key."""
    from herald.auth.issuer import LocalIssuer
    from herald.settings import load

    settings = load({"data": str(data), "port": port}, env=ingest.server_env()).settings
    issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    app = issuer.mint(client_id=client_id, user_id=None, ttl_seconds=TOKEN_TTL)
    names = {u: user_name(u) for u in range(users)} | {-1: WARMUP_USER}
    tokens = {
        u: issuer.mint(client_id=client_id, user_id=name, ttl_seconds=TOKEN_TTL)
        for u, name in names.items()
    }
    return app, tokens


async def subscribe_all(base: str, tokens: dict[int, str], devices: int) -> dict[int, str]:
    """One `live` subscription per device (device d belongs to user d // 2; -1, -2: warm-up)."""
    owners = {d: d // 2 for d in range(devices)} | {-1: -1, -2: -1}
    ids: dict[int, str] = {}
    gate = asyncio.Semaphore(32)
    body = {"application": HOST_NAME, "platform": "live"}

    async def one(session: aiohttp.ClientSession, device: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[owners[device]]}"}
        async with (
            gate,
            session.post(
                f"{base}/beta/me/notificationSubscriptions", json=body, headers=headers
            ) as resp,
        ):
            text = await resp.text()
            if resp.status != 201:
                raise RuntimeError(
                    f"POST /beta/me/notificationSubscriptions answered {resp.status}: {text[:300]}"
                )
            ids[device] = json.loads(text)["id"]

    async with aiohttp.ClientSession() as session:
        await one(session, -1)  # fail fast (e.g. 404 while the endpoint does not exist yet)
        await asyncio.gather(*(one(session, d) for d in owners if d != -1))
    return ids


# -- one target ------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    devices: int
    connected: int = 0
    connect_failures: dict[str, int] = field(default_factory=dict)
    open_s: float = 0.0
    rss_before_kb: int = 0
    rss_mid_kb: int = 0  # after the first half of the devices connected
    rss_after_kb: int = 0
    connected_mid: int = 0
    client_kb_per_conn: float = 0.0
    posts_sent: int = 0
    posts_acked: int = 0
    post_errors: dict[str, int] = field(default_factory=dict)
    post_rate: float = 0.0
    max_lag_ms: float = 0.0
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    expected: int = 0
    received: int = 0  # distinct (notification, device) pairs that were expected
    missing: int = 0
    duplicates: int = 0
    misrouted: int = 0
    unacked_delivered: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_pct: float = 0.0
    server_cpu_s: float = 0.0  # while posting
    db_cpu_pct: float = 0.0  # this server's own PostgreSQL backends (--store postgres)
    db_cpu_s: float = 0.0
    redis_cpu_pct: float = 0.0  # the redis-server (--nodes)
    redis_cpu_s: float = 0.0
    nodes: int = 1
    same_p50_ms: float = 0.0  # --nodes: devices on the node the posts go to
    same_p99_ms: float = 0.0
    cross_p50_ms: float = 0.0  # --nodes: devices on the other nodes
    cross_p99_ms: float = 0.0
    node_gc_ms: list[float] = field(default_factory=list)  # longest pause while posting, by node
    devices_gc_ms: float = 0.0  # the device workers' longest collection while posting
    poster_gc_ms: float = 0.0  # the poster's (this process's) longest collection while posting
    stalls_ms: list[float] = field(default_factory=list)  # the stall probe's, longest first
    devices_cpu_pct: float = 0.0  # the device worker processes
    poster_cpu_pct: float = 0.0  # this process: the app server posting
    other_cpu_pct: float = 0.0
    other_messages: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    window_ns: tuple[int, int] = (0, 0)  # from the first POST sent to the last one answered
    connecting_ns: tuple[int, int] = (0, 0)  # from the first device connecting to the last
    # Every collection of the server's life: (generation, start ns, duration ms); 3 = forced.
    gc: list[tuple[int, int, float]] = field(default_factory=list)
    server_log: str = ""  # errors/warnings the server logged until the end of the run
    shutdown_log: str = ""  # … and while it was being stopped
    error: str | None = None

    @property
    def kb_per_conn(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / self.connected if self.connected else 0.0

    @property
    def kb_per_conn_marginal(self) -> float:
        """The second half of the connections only."""
        n = self.connected - self.connected_mid
        return (self.rss_after_kb - self.rss_mid_kb) / n if n > 0 else 0.0


def make_devices(target: Target, count: int) -> list[Device]:
    return [
        Device(d, d // 2, target.stream_url[d], target.user_tokens.get(d // 2))
        for d in range(count)
    ]


async def warm_up(target: Target) -> None:
    """Two devices of a spare user get a few notifications, so one-time costs (lazy imports,
    first-use caches) are paid before the "before" memory reading, and a broken pipeline fails
    here with a clear message instead of as 40,000 missing deliveries."""
    token = target.user_tokens.get(-1)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    run_id = uuid.uuid4().hex[:12]
    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(target.stream_url[d], headers=headers, compress=0)
            for d in (-1, -2)
        ]
        for ws in sockets:
            first = await asyncio.wait_for(ws.receive(), CONNECT_TIMEOUT)
            if json.loads(first.data)["type"] != "ready":
                raise RuntimeError(f"warm-up: first message is not ready: {first.data!r}")
        url = target.base + target.post_path.format(user=WARMUP_USER)
        for seq in range(20):
            body = notification_body(seq, run_id)
            async with session.post(url, data=body, headers=target.post_headers()) as resp:
                if resp.status not in (200, 201):
                    raise RuntimeError(f"warm-up POST answered {resp.status}: {await resp.text()}")
            for ws in sockets:
                msg = await asyncio.wait_for(ws.receive(), 10)
                if json.loads(msg.data).get("type") != "created":
                    raise RuntimeError(f"warm-up: expected created, got {msg.data!r}")
        for ws in sockets:
            await ws.close()
    await asyncio.sleep(0.5)


def drain(workers: Workers, expected: int, quiet_s: float) -> None:
    """Wait until every expected delivery arrived, or nothing new came for `quiet_s`."""
    last, last_change = -1, time.monotonic()
    while True:
        got = sum(workers.ask("count"))
        if got >= expected:
            time.sleep(0.5)  # a little longer, so late duplicates are seen too
            return
        if got != last:
            last, last_change = got, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return
        time.sleep(0.1)


def tally(result: Result, posts: Posts, replies: list[Any]) -> None:
    """Match deliveries to posts: latency, missing, duplicates, misrouted."""
    acked = [s in (200, 201) for s in posts.status]
    seen: Counter[tuple[int, int]] = Counter()
    latencies: list[float] = []
    by_node: tuple[list[float], list[float]] = ([], [])  # same-node, cross-node (--nodes)
    for seqs_b, devs_b, times_b, other, closes in replies:
        seqs, devs, times = (array.array("q") for _ in range(3))
        seqs.frombytes(seqs_b)
        devs.frombytes(devs_b)
        times.frombytes(times_b)
        for seq, dev, t in zip(seqs, devs, times, strict=True):
            if not 0 <= seq < len(acked) or dev // 2 != posts.users[seq]:
                result.misrouted += 1
                continue
            seen[(seq, dev)] += 1
            if seen[(seq, dev)] == 1 and acked[seq]:
                latencies.append((t - posts.sent_ns[seq]) / 1e6)
                by_node[dev % result.nodes != 0].append(latencies[-1])
        for k, v in other.items():
            result.other_messages[k] = result.other_messages.get(k, 0) + v
        for k, v in closes.items():
            result.closes[k] = result.closes.get(k, 0) + v
    result.duplicates = sum(n - 1 for n in seen.values() if n > 1)
    result.unacked_delivered = sum(1 for (seq, _) in seen if not acked[seq])
    result.expected = 2 * sum(acked)  # both devices of the user (all were connected, checked)
    result.received = len(latencies)
    result.missing = result.expected - result.received
    latencies.sort()
    result.p50_ms = percentile(latencies, 50)
    result.p99_ms = percentile(latencies, 99)
    result.max_ms = latencies[-1] if latencies else float("nan")
    if result.nodes > 1:
        same, cross = (sorted(xs) for xs in by_node)
        result.same_p50_ms, result.same_p99_ms = percentile(same, 50), percentile(same, 99)
        result.cross_p50_ms, result.cross_p99_ms = percentile(cross, 50), percentile(cross, 99)


def summarise_posts(result: Result, posts: Posts) -> None:
    result.posts_sent = len(posts.status)
    result.posts_acked = sum(1 for s in posts.status if s in (200, 201))
    result.post_errors = dict(posts.errors)
    result.post_rate = result.posts_sent / posts.elapsed_s if posts.elapsed_s else 0.0
    result.max_lag_ms = max(posts.lag_ns, default=0) / 1e6
    acks = sorted((a - s) / 1e6 for a, s in zip(posts.ack_ns, posts.sent_ns, strict=True))
    result.ack_p50_ms = percentile(acks, 50)
    result.ack_p99_ms = percentile(acks, 99)


@dataclass(frozen=True)
class Servers:
    """The processes of one target: its nodes, and the redis-server joining them (--nodes)."""

    pids: list[int]
    redis_pid: int | None = None

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids)

    def cpu_seconds(self) -> float:
        return sum(ingest.proc_cpu_seconds(pid) for pid in self.pids)

    def redis_cpu_seconds(self) -> float:
        return ingest.proc_cpu_seconds(self.redis_pid) if self.redis_pid else 0.0

    def signal(self, signum: int) -> None:
        for pid in self.pids:
            os.kill(pid, signum)


def measure(args: argparse.Namespace, target: Target, servers: Servers, result: Result) -> None:
    """Warm up, then run the devices' workers through one measurement."""
    asyncio.run(warm_up(target))
    workers = Workers(make_devices(target, args.devices), args.workers, args.open_rate)
    try:
        workers.check_clock()
        measure_with(args, target, servers, result, workers)
    finally:
        workers.stop()


def measure_with(
    args: argparse.Namespace, target: Target, servers: Servers, result: Result, workers: Workers
) -> None:
    """Read memory, connect the devices, read memory, post, drain, tally."""
    result.rss_before_kb = servers.rss_kb()
    log(f"{target.name}: opening {args.devices:,} WebSockets at {args.open_rate:g}/s")
    t0, connect0 = time.monotonic(), time.monotonic_ns()
    # In two halves: the second half's memory is a marginal figure, free of whatever the
    # server had allocated and released before (e.g. Herald creating the subscriptions).
    result.connected_mid = sum(n for n, _, _ in workers.ask("open-1"))
    time.sleep(SETTLE_S)
    result.rss_mid_kb = servers.rss_kb()
    opened = workers.ask("open-2")
    result.open_s = time.monotonic() - t0 - SETTLE_S
    result.connected = sum(n for n, _, _ in opened)
    for _, failures, _ in opened:
        for k, v in failures.items():
            result.connect_failures[k] = result.connect_failures.get(k, 0) + v
    client_kb = sum(kb for _, _, kb in opened)
    result.client_kb_per_conn = client_kb / result.connected if result.connected else 0.0
    if result.connected < args.devices:
        raise RuntimeError(
            f"only {result.connected:,} of {args.devices:,} devices connected: "
            f"{result.connect_failures}"
        )
    probe = StallProbe()
    time.sleep(SETTLE_S)  # idle: nothing in flight, handshake buffers released
    result.rss_after_kb = servers.rss_kb()
    result.connecting_ns = (connect0, time.monotonic_ns())
    if args.gc_freeze:  # move everything alive now out of the collector's reach
        servers.signal(signal.SIGUSR1)
    ingest.wait_quiet(
        args.wait_quiet,
        lambda: servers.cpu_seconds() + workers.cpu_seconds() + ingest.own_cpu(),
        log,
    )
    log(f"{target.name}: {result.connected:,} connected, posting {args.rate:g}/s")
    cpu0 = (
        servers.cpu_seconds(),
        workers.cpu_seconds(),
        ingest.own_cpu(),
        0.0,
        servers.redis_cpu_seconds(),
    )
    own = target.db_backends() if target.db_backends is not None else []
    db0 = sum(ingest.pids_cpu_seconds(own))
    busy0, wall0 = ingest.system_busy_seconds(), time.monotonic()
    full_gc = None
    if args.full_gc:  # halfway through posting: the worst case, inside the window for sure
        full_gc = threading.Timer(args.duration / 2, servers.signal, (signal.SIGRTMIN,))
        full_gc.start()
    # The poster is part of the instrument too: a POST's clock starts before the poster writes it,
    # and this process's own full collections (89 and 57 ms measured, with every device's URL
    # and token in its heap) held posts back and showed up as late deliveries.
    gc.collect()
    gc.freeze()
    gc.disable()
    poster_pauses = Pauses()
    posting = time.monotonic_ns()
    try:
        posts = uvloop.run(post_all(target, args.devices // 2, args.rate, args.duration, args.seed))
    finally:
        if full_gc is not None:
            full_gc.cancel()
        gc.callbacks.remove(poster_pauses.callback)
        gc.enable()
        gc.unfreeze()
        stalls = probe.stop(posting)
    result.poster_gc_ms = max((ms for _, ms in poster_pauses.record), default=0.0)
    result.stalls_ms = sorted((ms for _, ms in stalls), reverse=True)
    summarise_posts(result, posts)
    result.window_ns = (min(posts.sent_ns), max(posts.ack_ns))
    server_cpu = servers.cpu_seconds() - cpu0[0]
    devices_cpu, poster_cpu = workers.cpu_seconds() - cpu0[1], ingest.own_cpu() - cpu0[2]
    # Only the backends there when posting began: the pool opens its connections at start-up.
    database_cpu = sum(ingest.pids_cpu_seconds(own)) - db0
    redis_cpu = servers.redis_cpu_seconds() - cpu0[4]
    wall = time.monotonic() - wall0
    other = ingest.system_busy_seconds() - busy0 - server_cpu - devices_cpu - poster_cpu
    other -= database_cpu + redis_cpu
    result.db_cpu_pct = 100 * database_cpu / wall
    result.db_cpu_s = database_cpu
    result.redis_cpu_pct = 100 * redis_cpu / wall
    result.redis_cpu_s = redis_cpu
    result.server_cpu_pct = 100 * server_cpu / wall
    result.server_cpu_s = server_cpu
    result.devices_cpu_pct = 100 * devices_cpu / wall
    result.poster_cpu_pct = 100 * poster_cpu / wall
    result.other_cpu_pct = max(0.0, 100 * other / wall)
    drain(workers, 2 * result.posts_acked, args.drain)
    start, end = result.window_ns
    result.devices_gc_ms = max(
        (ms for record in workers.ask("gc") for t, ms in record if start <= t <= end), default=0.0
    )
    replies = workers.ask("collect")
    tally(result, posts, replies)
    if args.keep:
        dump(args.work, target.name, posts, replies)


def dump(work: Path, name: str, posts: Posts, replies: list[Any]) -> None:
    """--keep: the raw timings as CSV, for looking at latency over time."""
    with (work / f"{name}-posts.csv").open("w") as out:
        out.write("seq,user,sent_ns,ack_ns,status,lag_ns\n")
        for seq, row in enumerate(
            zip(posts.users, posts.sent_ns, posts.ack_ns, posts.status, posts.lag_ns, strict=True)
        ):
            out.write(",".join(map(str, (seq, *row))) + "\n")
    with (work / f"{name}-deliveries.csv").open("w") as out:
        out.write("seq,device,recv_ns\n")
        for seqs_b, devs_b, times_b, _, _ in replies:
            cols = [array.array("q", b) for b in (seqs_b, devs_b, times_b)]
            for row in zip(*cols, strict=True):
                out.write(",".join(map(str, row)) + "\n")


def python_module(module: str) -> list[str]:
    """`python -m module` under the GC recorder."""
    return [sys.executable, "-c", GC_WRAPPER, module]


def uvicorn_argv(port: int) -> list[str]:
    # Herald's WebSocket settings (server.py): no pings (0 turns them off), no compression.
    flags = ["--ws-ping-interval", "0", "--ws-per-message-deflate", "false"]
    return [*python_module("uvicorn"), *ingest.uvicorn_flags("fanout_baseline:app", port), *flags]


def check_server_nofile(pid: int, devices: int) -> None:
    limit = nofile_limit(pid)
    if limit < devices + 100:
        raise RuntimeError(f"server open-files limit {limit} is too low for {devices} sockets")


def failure(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError):
        return str(exc)
    import traceback

    return "".join(traceback.format_exception(exc)).strip()


def log_problems(path: Path, start: int, end: int | None, limit: int = 12) -> str:
    """Errors and warnings the server logged between two byte offsets, counted by kind (a
    traceback is summed up by its message and its last line)."""
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(start)
        raw = f.read() if end is None else f.read(end - start)
        kinds: Counter[str] = Counter()
        for line in raw.decode(errors="replace").splitlines():
            kind = problem(line)
            if kind:
                kinds[kind] += 1
        return "\n".join(f"{n}x {kind}" for kind, n in kinds.most_common(limit))
    return ""


def problem(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if isinstance(entry, dict):
        if str(entry.get("level", "")).lower() not in {"warning", "error", "critical"}:
            return None
        exc = str(entry.get("exception", "")).strip().splitlines()
        last = f" | {exc[-1]}" if exc else ""
        return f"{entry['level']}: {str(entry.get('message', '')).strip()}{last}"[:300]
    if any(k in line for k in ("Traceback", "Error", "ERROR", "WARNING")):
        return line.strip()[:300]
    return None


def stop_server(
    procs: ingest.Processes,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    result: Result,
    gc_file: Path,
) -> None:
    """Stop the server; its problems are reported apart: during the run, and at shutdown."""
    size = log_path.stat().st_size if log_path.exists() else 0
    record = gc_record(proc, gc_file)
    result.gc += record
    start, end = result.window_ns
    result.node_gc_ms.append(max((d for _, t, d in record if start <= t <= end), default=0.0))
    procs.stop(proc)
    result.server_log += log_problems(log_path, 0, size)
    result.shutdown_log += log_problems(log_path, size, None)


def gc_record(proc: subprocess.Popen[bytes], path: Path) -> list[tuple[int, int, float]]:
    """Every collection the server made so far: (generation, start ns, ms)."""
    if proc.poll() is not None:
        return []
    path.unlink(missing_ok=True)
    os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            log(f"no GC record from pid {proc.pid}")
            return []
        time.sleep(0.05)
    raw = path.read_bytes()
    n = len(raw) // 24
    gens, starts, lengths = (array.array("q", raw[i * 8 * n : (i + 1) * 8 * n]) for i in range(3))
    return [(g, t, d / 1e6) for g, t, d in zip(gens, starts, lengths, strict=True)]


@dataclass
class Nodes:
    """The server processes of one target (one unless --nodes) and the Redis joining them."""

    procs: ingest.Processes
    work: Path
    name: str
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    redis: subprocess.Popen[bytes] | None = None
    redis_url: str | None = None

    def start_redis(self) -> None:
        port = ingest.free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.work)]
        self.redis = self.procs.start(argv, dict(os.environ), self.work / f"{self.name}-redis.log")
        self.redis_url = f"redis://{HOST}:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_answers(port):
            if time.monotonic() > deadline or self.redis.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {self.redis_url}")
            time.sleep(0.05)

    def start(self, argv_for: Any, env: dict[str, str], health: str) -> None:
        """One server per node: `argv_for(port)` is its command line."""
        for node, port in enumerate(self.ports):
            log_path = self.work / f"{self.name}-{node}.log"
            gc_file = self.work / f"{self.name}-{node}.gc"
            proc = self.procs.start(argv_for(port), env | {GC_FILE_ENV: str(gc_file)}, log_path)
            self.started.append((proc, log_path, gc_file))
            ingest.wait_ready(proc, port, health, log_path)

    def servers(self) -> Servers:
        return Servers([p.pid for p, _, _ in self.started], self.redis.pid if self.redis else None)

    def check(self, devices: int) -> None:
        for proc, log_path, _ in self.started:
            check_server_nofile(proc.pid, devices)
            if proc.poll() is not None:
                raise RuntimeError(f"a server exited during the run:\n{ingest.tail(log_path)}")

    def stop(self, result: Result) -> None:
        for proc, log_path, gc_file in self.started:
            stop_server(self.procs, proc, log_path, result, gc_file)
        if self.redis is not None:
            self.procs.stop(self.redis)


def redis_answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def nodes_for(args: argparse.Namespace, procs: ingest.Processes, work: Path, name: str) -> Nodes:
    nodes = Nodes(procs, work, name, ports=[ingest.free_port() for _ in range(args.nodes)])
    if args.nodes > 1:
        nodes.start_redis()
    return nodes


def node_urls(ports: list[int], path_for: Any, devices: dict[int, Any]) -> dict[int, str]:
    """Device d on node d % len(ports); `path_for(key)` is its stream path."""
    return {d: f"ws://{HOST}:{ports[d % len(ports)]}{path_for(key)}" for d, key in devices.items()}


def run_baseline(args: argparse.Namespace, procs: ingest.Processes, work: Path) -> Result:
    result = Result("baseline", args.devices, nodes=args.nodes)
    nodes = nodes_for(args, procs, work, "baseline")
    try:
        env = ingest.server_env()
        if nodes.redis_url:
            env["FANOUT_REDIS_URL"] = nodes.redis_url
        nodes.start(uvicorn_argv, env, "/healthz")
        nodes.check(args.devices)
        base = f"http://{HOST}:{nodes.ports[0]}"
        users = {d: user_name(d // 2) for d in range(args.devices)}
        users |= {-1: WARMUP_USER, -2: WARMUP_USER}  # one on each node (-1 % 2, -2 % 2)
        urls = node_urls(nodes.ports, "/stream/{}".format, users)
        target = Target("baseline", base, urls, "/users/{user}/notifications", None, {})
        measure(args, target, nodes.servers(), result)
    except Exception as exc:  # reported in the table; the run goes on to the next target
        result.error = failure(exc)
    finally:
        nodes.stop(result)
    return result


def run_herald(args: argparse.Namespace, procs: ingest.Processes, work: Path) -> Result:
    name = f"herald-{args.store}" + (f"-{args.nodes}-nodes" if args.nodes > 1 else "")
    result = Result(name, args.devices, nodes=args.nodes)
    # One machine: the nodes share the data directory, hence the embedded issuer's key.
    data = work / "herald"
    data.mkdir()
    env = ingest.server_env(EXTRA_LIMITS_ENV)
    store_url, pg_admin, schema = None, None, f"fanout_{uuid.uuid4().hex[:12]}"
    nodes = None
    try:
        nodes = nodes_for(args, procs, work, "herald")
        if nodes.redis_url:
            env |= {"HERALD_BROKER": "redis", "HERALD_REDIS_URL": nodes.redis_url}
        if args.store == "postgres":
            pg_admin = ingest.postgres_url(args)
            ingest.pg(pg_admin, f"CREATE SCHEMA {schema}")
            store_url = ingest.with_search_path(pg_admin, schema) + f"&application_name={schema}"
        client_id = ingest.register_app(data, store_url, env)
        log("herald: minting tokens")
        app_token, tokens = mint_tokens(data, nodes.ports[0], client_id, args.devices // 2)

        def argv_for(port: int) -> list[str]:
            argv = [*python_module("herald"), "serve", "--data", str(data), "--port", str(port)]
            return argv + (["--store", store_url] if store_url else [])

        nodes.start(argv_for, env, "/healthz")
        nodes.check(args.devices)
        base = f"http://{HOST}:{nodes.ports[0]}"
        log(f"herald: creating {args.devices:,} subscriptions")
        ids = asyncio.run(subscribe_all(base, tokens, args.devices))
        urls = node_urls(nodes.ports, "/beta/me/notificationSubscriptions/{}/stream".format, ids)
        own = ingest.backends(pg_admin, schema) if pg_admin is not None else None
        target = Target(
            "herald", base, urls, "/beta/users/{user}/notifications", app_token, tokens, own
        )
        measure(args, target, nodes.servers(), result)
        nodes.check(args.devices)
    except Exception as exc:  # reported in the table; Herald's log excerpt goes with it
        result.error = failure(exc)
    finally:
        if nodes is not None:
            nodes.stop(result)
        if pg_admin is not None:
            with contextlib.suppress(Exception):
                ingest.pg(pg_admin, f"DROP SCHEMA {schema} CASCADE")
    return result


# -- report ----------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_table(args: argparse.Namespace, results: list[Result]) -> None:
    p = print
    p()
    if args.gc_freeze:
        p()
        p("EXPERIMENT: --gc-freeze: both servers called gc.freeze() once all devices connected")
    p(
        f"Live fan-out: {args.devices:,} devices ({args.devices // 2:,} users x 2), "
        f"{args.rate:g} posts/s to random users for {args.duration:g} s, "
        f"{args.workers} device worker process(es)"
        + (f", {args.nodes} server processes per target joined by Redis" if args.nodes > 1 else "")
    )
    head = (
        f"{'target':<24} {'conns':>6} {'posts sent/acked':>17} {'deliv expected/recv':>20} "
        f"{'missing':>7} {'dup':>4} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'KB/conn':>7}"
    )
    p(head)
    p("-" * len(head))
    for r in results:
        if r.error and not r.posts_sent:
            p(f"{r.name:<24} NOT MEASURED: {r.error.splitlines()[0][:200]}")
            continue
        p(
            f"{r.name:<24} {r.connected:>6,} {f'{r.posts_sent:,}/{r.posts_acked:,}':>17} "
            f"{f'{r.expected:,}/{r.received:,}':>20} {r.missing:>7,} {r.duplicates:>4,} "
            f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} {r.kb_per_conn:>7.1f}"
        )
    p()
    for r in results:
        if r.posts_sent:
            print_details(r)
    base = next((r for r in results if r.name == "baseline" and r.posts_sent), None)
    for r in results:
        if r.name != "baseline" and r.posts_sent:
            print_verdict(r, base, args.target_p99)
    noisy = [r.name for r in results if r.posts_sent and r.other_cpu_pct > NOISY_OTHER_PCT]
    if noisy:
        p()
        p(
            f"warning: other processes used >{NOISY_OTHER_PCT:g}% of a core while posting to "
            f"{', '.join(noisy)}: latency figures include that contention"
        )


def print_details(r: Result) -> None:
    p = print
    p(
        f"{r.name}: posts at {r.post_rate:,.0f}/s (max schedule lag {r.max_lag_ms:.1f} ms), "
        f"POST answered p50 {r.ack_p50_ms:.2f} ms / p99 {r.ack_p99_ms:.2f} ms; "
        f"opened in {r.open_s:.1f} s"
    )
    p(
        f"  memory: server RSS {r.rss_before_kb / 1024:,.1f} -> {r.rss_mid_kb / 1024:,.1f} -> "
        f"{r.rss_after_kb / 1024:,.1f} MiB (none, half, all connected) = {r.kb_per_conn:.1f} KB "
        f"per idle connection ({r.kb_per_conn_marginal:.1f} for the second half); "
        f"client {r.client_kb_per_conn:.1f} KB/conn"
    )
    if r.nodes > 1:
        p(
            f"  same-node devices p50 {r.same_p50_ms:.2f} ms / p99 {r.same_p99_ms:.2f} ms; "
            f"cross-node p50 {r.cross_p50_ms:.2f} ms / p99 {r.cross_p99_ms:.2f} ms "
            f"({ratio(r.cross_p99_ms, r.same_p99_ms)}); longest GC pause while posting by node "
            f"(ms): {', '.join(f'{ms:.1f}' for ms in r.node_gc_ms)}"
        )
    p(
        f"  CPU while posting (% of one core): server {r.server_cpu_pct:.0f}, "
        + (f"PostgreSQL {r.db_cpu_pct:.0f}, " if r.db_cpu_pct else "")
        + (f"Redis {r.redis_cpu_pct:.0f}, " if r.nodes > 1 else "")
        + f"devices {r.devices_cpu_pct:.0f}, poster {r.poster_cpu_pct:.0f}, "
        f"everything else {r.other_cpu_pct:.0f}"
    )
    if r.received:
        # The POST that makes them included: what fan-out costs the server, per message out.
        p(
            f"  CPU per delivery: server {1e6 * r.server_cpu_s / r.received:.1f} µs"
            + (f", PostgreSQL {1e6 * r.db_cpu_s / r.received:.1f} µs" if r.db_cpu_s else "")
            + (f", Redis {1e6 * r.redis_cpu_s / r.received:.1f} µs" if r.nodes > 1 else "")
        )
    print_gc(r)
    print(
        f"  harness's longest GC pause while posting: device workers {r.devices_gc_ms:.1f} ms, "
        f"poster {r.poster_gc_ms:.1f} ms"
    )
    longest = ", ".join(f"{ms:.1f}" for ms in r.stalls_ms[:8]) or "none"
    print(
        f"  machine stalls while posting (an idle process's naps overslept > {STALL_MS:g} ms): "
        f"{len(r.stalls_ms)}, longest {longest} ms"
    )
    extras = {
        "misrouted": r.misrouted,
        "delivered without a 2xx": r.unacked_delivered,
        "connect failures": sum(r.connect_failures.values()),
    }
    if any(extras.values()) or r.post_errors or r.closes:
        p("  " + ", ".join(f"{k} {v}" for k, v in extras.items()))
    if r.post_errors:
        p(f"  POST errors: {r.post_errors}")
    if r.closes:
        p(f"  connections that ended during the run: {r.closes}")
    if r.other_messages:
        p(f"  other messages: {r.other_messages}")
    if r.error:
        p(f"  ERROR: {r.error}")
    for title, text in (("during the run", r.server_log), ("at shutdown", r.shutdown_log)):
        if text:
            p(f"  server log, {title} (errors/warnings, by kind):")
            for line in text.splitlines():
                p(f"    {line}")


GC_PHASES = ("connecting", "posting", "whole run")
GEN_NAMES = {0: "gen0", 1: "gen1", 2: "gen2", GC_FORCED: "gen2 forced"}


def gc_in(r: Result, phase: str) -> list[tuple[int, int, float]]:
    """The collections that began in a phase (the whole run: the server's whole life)."""
    bounds = {"connecting": r.connecting_ns, "posting": r.window_ns}.get(phase)
    if bounds is None:
        return r.gc
    return [c for c in r.gc if bounds[0] <= c[1] <= bounds[1]]


def gc_summary(pauses: list[tuple[int, int, float]]) -> str:
    parts = []
    for gen, name in GEN_NAMES.items():
        ms = [d for g, _, d in pauses if g == gen]
        if ms:
            parts.append(f"{name} {len(ms)} (longest {max(ms):.1f}, {sum(ms):.0f} ms in all)")
    return "; ".join(parts) or "none"


def print_gc(r: Result) -> None:
    if not r.gc:
        print("  server GC: no record")
        return
    for phase in GC_PHASES:
        pauses = gc_in(r, phase)
        print(f"  server GC {phase}: {gc_summary(pauses)}")
        if phase != "whole run":
            long = [f"{GEN_NAMES[g]} {d:.1f}" for g, _, d in pauses if d >= GC_REPORT_MS]
            if long:
                print(f"    pauses >= {GC_REPORT_MS:g} ms (ms): {', '.join(long)}")


def longest_gc(r: Result, phase: str) -> float:
    return max((d for _, _, d in gc_in(r, phase)), default=0.0)


def print_verdict(r: Result, base: Result | None, target_p99: float) -> None:
    p = print
    p()
    if base:
        p(
            f"{r.name} / baseline: p50 {ratio(r.p50_ms, base.p50_ms)}, "
            f"p99 {ratio(r.p99_ms, base.p99_ms)}, max {ratio(r.max_ms, base.max_ms)}, "
            f"KB/conn {ratio(r.kb_per_conn, base.kb_per_conn)}, "
            f"server CPU {ratio(r.server_cpu_pct, base.server_cpu_pct)}"
        )
    for name, ok in checks(r, target_p99).items():
        p(f"  [{'PASS' if ok else 'FAIL'}] {name}")


def checks(r: Result, target_p99_ms: float = TARGET_P99_MS) -> dict[str, bool]:
    posting_gc = longest_gc(r, "posting")
    nodes = {
        f"cross-node p99 <= {CROSS_NODE_P99_FACTOR:g}x same-node p99 "
        f"({r.cross_p99_ms:.2f} / {r.same_p99_ms:.2f})": (
            0 < r.cross_p99_ms <= CROSS_NODE_P99_FACTOR * r.same_p99_ms
        ),
        f"no node's GC pause > {NODES_GC_TARGET_MS:g} ms while posting ({posting_gc:.1f})": (
            len(r.node_gc_ms) == r.nodes and posting_gc <= NODES_GC_TARGET_MS
        ),
    }
    return (nodes if r.nodes > 1 else {}) | {
        f"p99 <= {target_p99_ms:g} ms ({r.p99_ms:.2f})": r.p99_ms <= target_p99_ms,
        f"max <= {TARGET_MAX_MS:g} ms ({r.max_ms:.1f})": r.max_ms <= TARGET_MAX_MS,
        f"no GC pause > {GC_TARGET_MS:g} ms while posting ({posting_gc:.1f})": (
            bool(r.gc) and posting_gc <= GC_TARGET_MS
        ),
        f"0 missing ({r.missing})": r.missing == 0 and r.received > 0,
        f"0 duplicates ({r.duplicates})": r.duplicates == 0,
        f"0 misrouted ({r.misrouted})": r.misrouted == 0,
        f"<= {TARGET_KB_PER_CONN:g} KB per idle connection ({r.kb_per_conn:.1f})": (
            0 < r.kb_per_conn <= TARGET_KB_PER_CONN
        ),
        "every POST answered 2xx": r.posts_acked == r.posts_sent > 0,
    }


def summary(r: Result) -> dict[str, Any]:
    """--json: the figures of one target."""
    out = {k: getattr(r, k) for k in ("name", "connected", "missing", "duplicates", "misrouted")}
    out |= {k: getattr(r, k) for k in ("p50_ms", "p99_ms", "max_ms", "kb_per_conn", "error")}
    out |= {
        "posts_sent": r.posts_sent,
        "posts_acked": r.posts_acked,
        "rss_after_kb": r.rss_after_kb,
    }
    out |= {"server_cpu_pct": r.server_cpu_pct, "other_cpu_pct": r.other_cpu_pct}
    if r.nodes > 1:
        out |= {k: getattr(r, k) for k in ("same_p50_ms", "same_p99_ms", "cross_p50_ms")}
        out |= {"cross_p99_ms": r.cross_p99_ms, "redis_cpu_pct": r.redis_cpu_pct}
        out |= {"node_gc_ms": r.node_gc_ms}
    for phase in GC_PHASES:
        out[f"gc {phase}"] = gc_summary(gc_in(r, phase))
        out[f"gc {phase} longest_ms"] = longest_gc(r, phase)
    return out


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000, help="connected devices, 2 per user")
    ap.add_argument("--rate", type=float, default=1000.0, help="notifications posted per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of posting (20)")
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--postgres-url", help="PostgreSQL URL (default: run scripts/postgres as root)")
    ap.add_argument("--targets", default="baseline,herald", help="baseline,herald (both)")
    ap.add_argument("--workers", type=int, default=2, help="device worker processes (2)")
    ap.add_argument("--open-rate", type=float, default=500.0, help="new connections per second")
    ap.add_argument("--drain", type=float, default=5.0, help="max quiet seconds after posting")
    ap.add_argument("--seed", type=int, default=1, help="random seed for the users posted to")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before posting, wait up to S s for the rest of the machine to be idle",
    )
    ap.add_argument(
        "--no-full-gc",
        dest="full_gc",
        action="store_false",
        help="do not make the servers run a full collection halfway through posting",
    )
    ap.add_argument("--target-p99", type=float, default=TARGET_P99_MS, help="ms (10)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    ap.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: gc.freeze() in the servers once all are connected",
    )
    ap.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="server processes per target, joined by Redis (> 1: PostgreSQL only)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 1,000 devices, 5 s")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.duration = 1000, 5.0
    if args.devices < 2 or args.devices % 2:
        ap.error("--devices must be an even number >= 2")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if set(args.targets) - {"baseline", "herald"}:
        ap.error("--targets: baseline and/or herald")
    if args.nodes < 1 or (args.nodes > 1 and args.store != "postgres" and "herald" in args.targets):
        ap.error("--nodes > 1 needs --store postgres (SQLite serves one process)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hard = raise_nofile()  # inherited by the servers started below
    if hard < args.devices + 100:
        sys.exit(f"fanout: open-files hard limit {hard} is too low for {args.devices} sockets")
    procs = ingest.Processes()
    work = Path(tempfile.mkdtemp(prefix="herald-fanout-"))
    args.work = work
    results: list[Result] = []
    try:
        with ingest.signals_stop(procs):
            for name in args.targets:
                log(f"{name}: running")
                run = run_baseline if name == "baseline" else run_herald
                results.append(run(args, procs, work))
                if results[-1].error:
                    log(f"{name}: {results[-1].error}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(args, results)
    herald = [r for r in results if r.name != "baseline"]
    if args.json:
        Path(args.json).write_text(json.dumps([summary(r) for r in results], indent=1))
    return 0 if all(all(checks(r, args.target_p99).values()) for r in herald) else 1


if __name__ == "__main__":
    sys.exit(main())
