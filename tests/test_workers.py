"""`herald serve --workers N` as a real process tree on PostgreSQL and a real redis-server: the
workers share the port (each its own SO_REUSEPORT socket) and connections reach more than one;
each worker's /metrics is reachable on its own port; a killed worker is replaced; SIGTERM to
each worker in turn, while a client posts and devices stream, loses no acknowledged post, and
the devices are told to resume (1012) and end equal to delta; SIGTERM to the supervisor drains
and exits 0, and a killed supervisor's workers exit too; workers that cannot bind stop the
supervisor; a draining server takes no new connection; SIGHUP to the supervisor replaces every
worker, one at a time, with the config file read again, while the port keeps answering. Refused
with SQLite or the memory broker (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from herald.auth.issuer import LocalIssuer
from tests.devices import CHANGE_TYPES, Refused, api, open_stream, subscription_body
from tests.processes import UNLIMITED, register, start
from tests.redis import RedisServer
from tests.test_nodes import delta

HOST = "workers.example.com"
WORKERS = 2


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    for _ in range(200):
        first = random.randint(20_000, 60_000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free port range")


@dataclass
class Workers:
    """A running `herald serve --workers N`: the supervisor and where each worker listens."""

    proc: subprocess.Popen[bytes]
    port: int
    worker_port: int
    count: int
    log: Path
    pids: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_base(self, index: int) -> str:
        return f"http://127.0.0.1:{self.worker_port + index}"

    def scrape(self, index: int) -> dict[str, list[Any]]:
        """Worker `index`'s metrics, read on its own port: name -> samples."""
        r = httpx.get(f"{self.worker_base(index)}/metrics", timeout=5, trust_env=False)
        assert r.status_code == 200, r.text
        return {f.name: f.samples for f in text_string_to_metric_families(r.text)}

    def pid(self, index: int) -> int:
        (sample,) = self.scrape(index)["herald_worker_info"]
        assert sample.labels["index"] == str(index), sample
        return int(sample.labels["pid"])

    def wait_ready(self, index: int, not_pid: int | None = None, wait: float = 30) -> float:
        """Wait until worker `index` answers on its port (with a pid other than `not_pid`);
        how long that took."""
        began = time.monotonic()
        while time.monotonic() - began < wait:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError, AssertionError, ValueError):
                pid = self.pid(index)
                if pid != not_pid:
                    return time.monotonic() - began
            time.sleep(0.05)
        raise AssertionError(f"worker {index} not ready: {self.log.read_text()[-3000:]}")

    def children(self) -> set[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(pid) for pid in path.read_text().split()}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def serve(
    data: Path, store_url: str | None, count: int | None, **env: str
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "herald", "serve", "--data", str(data)]
    if count is not None:
        args += ["--workers", str(count)]
    if store_url:
        args += ["--store", store_url]
    environment = {**os.environ, **UNLIMITED, "HERALD_LOG_FORMAT": "text", **env}
    with (data / "server.log").open("ab") as log:
        return subprocess.Popen(args, env=environment, stdout=log, stderr=log)


@contextlib.contextmanager
def workers(
    data: Path, store_url: str, redis: RedisServer, count: int = WORKERS, **extra: str
) -> Iterator[Workers]:
    first = free_ports(count + 1)
    env = {
        "HERALD_BROKER": "redis",
        "HERALD_REDIS_URL": redis.url,
        "HERALD_PORT": str(first),
        "HERALD_WORKER_PORT": str(first + 1),
        **extra,
    }
    running = Workers(
        serve(data, store_url, count, **env), first, first + 1, count, data / "server.log"
    )
    try:
        for index in range(count):
            running.wait_ready(index)
        running.pids = [running.pid(index) for index in range(count)]
        yield running
    finally:
        running.stop()


def handled(samples: list[Any], handler: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == "herald_http_requests_total" and s.labels["handler"] == handler
    )


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "broker", "says"),
    [
        ("sqlite", "redis", "workers > 1 needs the PostgreSQL store"),
        ("postgres", "memory", "workers > 1 needs broker = 'redis'"),
    ],
)
def test_workers_refused_with_sqlite_or_the_memory_broker(
    tmp_path: Path, store: str, broker: str, says: str
) -> None:
    """One line, a non-zero exit, no traceback; the setting (HERALD_WORKERS) as the flag."""
    store_url = f"sqlite:///{tmp_path / 'h.db'}"
    if store == "postgres":
        store_url = "postgresql://herald@127.0.0.1:1/none"  # refused before any connection
    env = {"HERALD_BROKER": broker, "HERALD_PORT": str(free_ports(3))}
    if broker == "redis":
        env["HERALD_REDIS_URL"] = "redis://127.0.0.1:1/0"  # checked, never reached
    for variant in ("flag", "setting"):
        if variant == "flag":
            proc = serve(tmp_path, store_url, 2, **env)
        else:
            proc = serve(tmp_path, store_url, None, **env, HERALD_WORKERS="2")
        try:
            assert proc.wait(30) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        output = (tmp_path / "server.log").read_text()
        (tmp_path / "server.log").unlink()
        assert "Traceback" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and says in errors[0], output


@pytest.mark.postgres
def test_workers_share_the_port_and_each_is_scraped_on_its_own(
    tmp_path: Path, postgres_store: str, redis_service: RedisServer
) -> None:
    """Each worker binds its own socket on the port (two listeners, one per worker pid, not one
    shared accept queue); new connections reach both; each worker's /metrics, on its own port,
    counts what it served and names its index and pid."""
    with workers(tmp_path, postgres_store, redis_service) as running:
        assert set(running.pids) == running.children() - resource_tracker(running), running.pids
        listeners = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{running.port}"], capture_output=True, text=True
        ).stdout.splitlines()
        assert len(listeners) == WORKERS, listeners
        for pid in running.pids:
            assert sum(f"pid={pid}," in line for line in listeners) == 1, listeners
        before = [handled(running.scrape(i)["herald_http_requests"], "healthz") for i in range(2)]
        requests = 60
        for _ in range(requests):  # a fresh connection each: the kernel picks a worker for each
            r = httpx.get(f"{running.base}/healthz", timeout=5, trust_env=False)
            assert r.status_code == 200
        after = [handled(running.scrape(i)["herald_http_requests"], "healthz") for i in range(2)]
        served = [a - b for a, b in zip(after, before, strict=True)]
        print(f"\n{requests} connections to the shared port: per worker {served}")
        assert sum(served) == requests
        assert all(n > 0 for n in served), served


def resource_tracker(running: Workers) -> set[int]:
    """multiprocessing's resource tracker, a child of the supervisor that is not a worker."""
    return {
        pid
        for pid in running.children()
        if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


@pytest.mark.postgres
def test_a_killed_worker_is_restarted_and_sigterm_drains_all(
    tmp_path: Path, postgres_store: str, redis_service: RedisServer
) -> None:
    """kill -9 a worker: the port keeps serving (the other worker), the supervisor logs it and
    starts a new one, which serves. SIGTERM to the supervisor: every worker exits, then the
    supervisor, with status 0."""
    with workers(tmp_path, postgres_store, redis_service) as running:
        victim = running.pids[0]
        os.kill(victim, signal.SIGKILL)
        began = time.monotonic()
        # Connections the kernel queued on its socket before it died are reset (no
        # tcp_migrate_req here); once it is gone, the other worker takes every new one.
        while not zombie(victim):
            assert time.monotonic() - began < 10
            time.sleep(0.01)
        for _ in range(20):
            r = httpx.get(f"{running.base}/healthz", timeout=5, trust_env=False)
            assert r.status_code == 200
        took = running.wait_ready(0, not_pid=victim)
        print(f"\nkill -9 of a worker: replaced and serving after {time.monotonic() - began:.1f} s")
        assert took < 20
        assert running.pid(0) not in running.pids
        log = running.log.read_text()
        assert f"worker 0 (pid {victim}) exited (SIGKILL); restarting it" in log, log[-2000:]
        pids = [running.pid(0), running.pid(1)]
        assert running.stop() == 0
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), pid
        assert "all workers have exited" in running.log.read_text()


@dataclass
class Device:
    """A device that streams, and resumes where it stopped whenever the stream ends."""

    protocol: str
    subscription: str
    token: str
    user: int
    start: int | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    ends: list[tuple[str | None, int | None]] = field(default_factory=list)  # (closing, code)
    refused: int = 0
    streaming: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> int | None:
        return self.received[-1]["position"] if self.received else self.start

    async def run(self, base: str, done: asyncio.Event) -> None:
        while not done.is_set():
            resume = self.last
            try:
                async with open_stream(
                    self.protocol,
                    base,
                    self.subscription,
                    self.token,
                    after=resume if self.protocol == "ws" else None,
                    last_event_id=resume if self.protocol == "sse" else None,
                ) as stream:
                    position = await stream.ready()
                    assert resume is None or position == resume, (position, resume)
                    if self.start is None:
                        self.start = position
                    self.streaming.set()
                    await self.read(stream, done)
            except (Refused, OSError, httpx.TransportError, websockets.WebSocketException):
                self.refused += 1  # the port had no worker for a moment: retry, as a client does
                await asyncio.sleep(0.05)

    async def read(self, stream: Any, done: asyncio.Event) -> None:
        closing = None
        while not done.is_set():
            try:
                kind, value = await asyncio.wait_for(stream.queue.get(), 0.2)
            except TimeoutError:
                continue
            if kind == "end":
                self.ends.append((closing, value.code))
                return
            if kind == "message" and value["type"] in CHANGE_TYPES:
                self.received.append(value)
            elif kind == "message" and value["type"] == "closing":
                closing = value["reason"]


@dataclass
class Poster:
    """Posts through the shared port with an Idempotency-Key, retrying what got no answer (or a
    503) with the same key, as a client does; keeps every acknowledged id."""

    tokens: list[str]
    acked: dict[str, int] = field(default_factory=dict)  # id -> user
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    async def run(self, base: str, done: asyncio.Event, client_index: int) -> None:
        clients = [api(base, token) for token in self.tokens]
        try:
            n = 0
            while not done.is_set():
                user = (client_index + n) % len(self.tokens)
                n += 1
                key = uuid.uuid4().hex
                body = {"targetHostName": HOST, "payload": {"rawContent": key}}
                for _ in range(100):
                    try:
                        r = await clients[user].post(
                            "/beta/me/notifications", json=body, headers={"Idempotency-Key": key}
                        )
                    except httpx.TransportError:
                        self.transport_errors += 1
                        await asyncio.sleep(0.02)
                        continue
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                    if r.status_code == 503:
                        await asyncio.sleep(0.02)
                        continue
                    assert r.status_code == 201, r.text
                    self.acked[r.json()["id"]] = user
                    break
                await asyncio.sleep(0.02)
        finally:
            for client in clients:
                await client.aclose()


@pytest.mark.postgres
def test_rolling_sigterm_of_each_worker_loses_nothing(
    tmp_path: Path, postgres_store: str, redis_service: RedisServer
) -> None:
    """SIGTERM to each worker in turn (the supervisor replaces it) while four clients post
    through the shared port and WebSocket and SSE devices stream from it: every 201 is in
    delta; nothing but 201 and 503 is answered; every stream that ended was told `shutdown` and
    (WebSocket) closed 1012; each device resumed and ends with exactly what delta returns after
    its first position, in order, once each."""
    users = 3
    client_id = register(tmp_path, postgres_store, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    tokens = [
        issuer.mint(client_id=client_id, user_id=f"roll-{i}-{uuid.uuid4().hex[:8]}")
        for i in range(users)
    ]

    with workers(tmp_path, postgres_store, redis_service) as running:

        async def scenario() -> tuple[list[Device], Poster, list[float]]:
            subs = []
            for token in tokens:
                async with api(running.base, token) as client:
                    r = await client.post(
                        "/beta/me/notificationSubscriptions", json=subscription_body(HOST, "live")
                    )
                    assert r.status_code == 201, r.text
                    subs.append(r.json()["id"])
            devices: list[Device] = []
            done, posting = asyncio.Event(), asyncio.Event()
            tasks = []
            # Devices on the shared port until each worker streams to at least two of them.
            while True:
                k = len(devices)
                device = Device(
                    "ws" if k % 2 else "sse", subs[k % users], tokens[k % users], k % users
                )
                devices.append(device)
                tasks.append(asyncio.create_task(device.run(running.base, done)))
                await asyncio.wait_for(device.streaming.wait(), 10)
                streams = [
                    sum(s.value for s in running.scrape(i)["herald_live_streams"])
                    for i in range(WORKERS)
                ]
                if min(streams) >= 2 or k >= 30:
                    break
            assert min(streams) >= 2, streams
            poster = Poster(tokens)
            posts = [asyncio.create_task(poster.run(running.base, posting, i)) for i in range(4)]
            drains = []
            try:
                await asyncio.sleep(1.0)
                for index in range(WORKERS):
                    old = running.pid(index)
                    os.kill(old, signal.SIGTERM)
                    drains.append(await asyncio.to_thread(running.wait_ready, index, old))
                    await asyncio.sleep(1.0)
                posting.set()
                await asyncio.gather(*posts)
                deadline = time.monotonic() + 20
                while not all(
                    {m["id"] for m in d.received}
                    >= {i for i, user in poster.acked.items() if user == d.user}
                    for d in devices
                ):
                    assert time.monotonic() < deadline, "devices did not get every 201"
                    await asyncio.sleep(0.05)
            finally:
                posting.set()
                done.set()
                await asyncio.gather(*posts, *tasks, return_exceptions=True)
            return devices, poster, drains

        devices, poster, drains = asyncio.run(scenario())
        ended = [end for d in devices for end in d.ends]
        print(
            f"\nrolling SIGTERM of {WORKERS} workers: {len(poster.acked)} posts acked,"
            f" statuses {poster.statuses}, {poster.transport_errors} retried after a transport"
            f" error; {len(devices)} devices, {len(ended)} streams ended"
            f" {sorted(set(map(str, ended)))},"
            f" {sum(d.refused for d in devices)} reconnects refused;"
            f" replaced in {', '.join(f'{t:.1f}' for t in drains)} s"
        )
        assert set(poster.statuses) <= {201, 503}, poster.statuses
        assert len(ended) >= 2 * WORKERS  # each worker streamed to at least two devices
        for closing, code in ended:
            assert closing == "shutdown", ended
            assert code in (1012, None), ended  # None: SSE (no close code)
        assert all(code == 1012 for d in devices if d.protocol == "ws" for _, code in d.ends)
        for user, token in enumerate(tokens):
            everything, _ = asyncio.run(delta(running.base, token, 0))
            acked = {i for i, u in poster.acked.items() if u == user}
            assert acked <= set(everything), "every 201 is in delta"
            assert len(everything) == len(set(everything))
        for device in devices:
            assert device.start is not None
            positions = [m["position"] for m in device.received]
            assert positions == sorted(set(positions)), "strictly increasing, no duplicates"
            ids, head = asyncio.run(delta(running.base, tokens[device.user], device.start))
            assert [m["id"] for m in device.received] == ids, "the device got what delta returns"


def test_a_draining_server_stops_accepting_before_it_closes_its_streams(
    tmp_path: Path,
) -> None:
    """A device told `shutdown` reconnects at once; with SO_REUSEPORT the kernel may hand its new
    connection to the draining worker itself, which must not take it (the device would be cut
    again, without a word, when the grace ends). So the listener closes first: while a stream
    whose client reads nothing holds the drain (its `closing` cannot be written), a new
    connection is refused, not served."""
    port = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    client_id = register(tmp_path, None, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    token = issuer.mint(client_id=client_id, user_id=f"stalled-{uuid.uuid4().hex[:8]}")
    proc = start(tmp_path, port, None)
    stalled = socket.socket()
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
            r = client.post("/beta/me/notificationSubscriptions", json=subscription_body(HOST))
            assert r.status_code == 201, r.text
            path = f"/beta/me/notificationSubscriptions/{r.json()['id']}/stream"
            # A tiny receive window and segment size (loopback's 64 KB segments would let the
            # server's kernel buffer grow to megabytes): its socket buffer fills at once.
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            stalled.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            )
            assert stalled.recv(12).startswith(b"HTTP/1.1 200"), "the stream is open"
            body = {"targetHostName": HOST, "payload": {"rawContent": "x" * 3500}}
            for _ in range(60):  # ~210 KB the client never reads: past uvicorn's 64 KiB mark
                assert client.post("/beta/me/notifications", json=body).status_code == 201
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the drain has begun; the stalled stream holds it for its grace (3 s)
        assert proc.poll() is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=2, trust_env=False)
    finally:
        stalled.close()
        if proc.poll() is None:
            proc.terminate()
        proc.wait(15)


@pytest.mark.postgres
def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    tmp_path: Path, postgres_store: str, redis_service: RedisServer
) -> None:
    """kill -9 of the supervisor: its workers do not live on unsupervised, holding the port;
    each drains and exits (the kernel signals them: PR_SET_PDEATHSIG)."""
    with workers(tmp_path, postgres_store, redis_service) as running:
        running.proc.kill()
        running.proc.wait()
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{pid}").exists() for pid in running.pids):
            # A zombie (reaped by init later) has exited too.
            alive = [pid for pid in running.pids if not zombie(pid)]
            if not alive:
                break
            assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.base}/healthz", timeout=2, trust_env=False)


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """The port is taken (by a socket without SO_REUSEPORT): each worker says so in one line,
    and the supervisor, with no worker ever serving, stops with a non-zero status instead of
    restarting them for ever."""
    first = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        env = {
            "HERALD_PORT": str(first),
            "HERALD_WORKER_PORT": str(first + 1),
            "HERALD_BROKER": "redis",
            "HERALD_REDIS_URL": "redis://127.0.0.1:1/0",
        }
        store_url = "postgresql://herald@127.0.0.1:1/none"  # never reached: binding fails first
        proc = serve(tmp_path, store_url, 2, **env)
        try:
            assert proc.wait(60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "server.log").read_text()
    # Whichever worker fails first stops the supervisor (the other may not get to say it).
    said = [f"worker {i} cannot listen on ports {first} and {first + 1 + i}" for i in (0, 1)]
    assert any(line in log for line in said), log[-3000:]
    assert "failed to start (exit code 3); stopping" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@dataclass
class Prober:
    """A new connection to the port every few milliseconds: counts those refused (no worker
    listening) and those cut (queued on a worker's socket as it closed it)."""

    answered: int = 0
    refused: int = 0
    cut: int = 0

    async def run(self, base: str, done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
                    r = await client.get(f"{base}/healthz")
                assert r.status_code == 200, r.text
                self.answered += 1
            except httpx.ConnectError:
                self.refused += 1
            except httpx.TransportError:
                self.cut += 1
            await asyncio.sleep(0.01)


def lines(running: Workers, text: str) -> int:
    return running.log.read_text().count(text)


def until_logged(running: Workers, text: str, wait: float) -> None:
    """Wait until the supervisor's log says `text`; fail with the log's tail after `wait` s."""
    deadline = time.monotonic() + wait
    while not lines(running, text):
        assert time.monotonic() < deadline, running.log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.postgres
def test_sighup_replaces_each_worker_with_the_config_read_again_while_the_port_answers(
    tmp_path: Path, postgres_store: str, redis_service: RedisServer
) -> None:
    """The config file says max_payload_bytes = 4096, then 2048, then the supervisor gets SIGHUP
    while clients post through the shared port and a prober opens new connections; a second
    SIGHUP comes during that rolling restart. Every post is answered 201 (or a documented 503),
    and each 201 is in delta; no new connection is refused (each replacement serves before its
    predecessor drains); the second SIGHUP is queued: one more rolling restart follows, never
    more than one worker process over the count; every worker pid changes and the supervisor
    stays; afterwards every worker refuses a 3000-byte payload (413) that was accepted before.
    A SIGHUP with a config file that cannot be used changes nothing; one whose first replacement
    cannot start (its store connection times out) stops there, the old workers serving on."""
    config = tmp_path / "herald.toml"
    config.write_text("max_payload_bytes = 4096\n")
    client_id = register(tmp_path, postgres_store, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    tokens = [
        issuer.mint(client_id=client_id, user_id=f"hup-{i}-{uuid.uuid4().hex[:8]}")
        for i in range(3)
    ]
    big = {"targetHostName": HOST, "payload": {"rawContent": "x" * 3000}}

    def post_big(base: str, size: int = 3000) -> int:
        body = {**big, "payload": {"rawContent": "x" * size}}
        headers = {"Authorization": f"Bearer {tokens[0]}"}
        r = httpx.post(f"{base}/beta/me/notifications", json=body, headers=headers, timeout=10)
        return r.status_code

    with workers(tmp_path, postgres_store, redis_service, HERALD_CONFIG=str(config)) as running:
        assert [post_big(running.worker_base(i)) for i in range(WORKERS)] == [201] * WORKERS

        async def scenario() -> tuple[Poster, Prober, float, int]:
            poster, prober = Poster(tokens), Prober()
            done = asyncio.Event()
            tasks = [asyncio.create_task(poster.run(running.base, done, i)) for i in range(3)]
            tasks.append(asyncio.create_task(prober.run(running.base, done)))
            most = 0  # worker processes at once
            try:
                await asyncio.sleep(0.5)
                config.write_text("max_payload_bytes = 2048\n")
                began = time.monotonic()
                running.proc.send_signal(signal.SIGHUP)
                again = False
                while lines(running, "rolling restart done") < 2:
                    assert running.proc.poll() is None, running.log.read_text()[-3000:]
                    assert time.monotonic() - began < 90, running.log.read_text()[-3000:]
                    if not again and lines(running, "replacement started"):
                        running.proc.send_signal(signal.SIGHUP)
                        again = True
                    with contextlib.suppress(OSError):  # a child exiting as it is read
                        most = max(most, len(running.children() - resource_tracker(running)))
                    await asyncio.sleep(0.02)
                took = time.monotonic() - began
                await asyncio.sleep(0.5)
            finally:
                done.set()
                await asyncio.gather(*tasks)
            return poster, prober, took, most

        poster, prober, took, most = asyncio.run(scenario())
        print(
            f"\nSIGHUP twice, {WORKERS} workers replaced twice in {took:.1f} s, at most {most}"
            f" worker processes: {len(poster.acked)} posts acked, statuses {poster.statuses},"
            f" {poster.transport_errors} retried after a transport error; new connections:"
            f" {prober.answered} answered, {prober.refused} refused, {prober.cut} cut"
        )
        assert set(poster.statuses) <= {201, 503}, poster.statuses
        assert poster.acked
        for user, token in enumerate(tokens):
            everything, _ = asyncio.run(delta(running.base, token, 0))
            acked = {i for i, u in poster.acked.items() if u == user}
            assert acked <= set(everything), "every 201 is in delta"
        assert prober.refused == 0, "the port had no worker listening"
        assert prober.answered > 0
        assert most <= WORKERS + 1, most
        assert lines(running, "SIGHUP during a rolling restart: queued") == 1
        assert lines(running, "replacement started") == 2 * WORKERS
        assert running.proc.poll() is None
        pids = [running.pid(i) for i in range(WORKERS)]
        assert not set(pids) & set(running.pids), (pids, running.pids)
        assert set(pids) == running.children() - resource_tracker(running)
        assert [post_big(running.worker_base(i)) for i in range(WORKERS)] == [413] * WORKERS
        assert post_big(running.base) == 413

        config.write_text("max_payload_bytes = -1\n")
        running.proc.send_signal(signal.SIGHUP)
        until_logged(running, "SIGHUP: the configuration cannot be used", 10)
        time.sleep(1.0)  # a rolling restart would have started by now
        assert lines(running, "replacement started") == 2 * WORKERS
        assert [running.pid(i) for i in range(WORKERS)] == pids
        assert post_big(running.base) == 413

        config.write_text("max_payload_bytes = 1024\npostgres_connect_timeout = 0.0001\n")
        running.proc.send_signal(signal.SIGHUP)
        until_logged(running, "rolling restart stopped: worker 0's replacement", 30)
        assert lines(running, "replacement started") == 2 * WORKERS + 1
        assert [running.pid(i) for i in range(WORKERS)] == pids
        assert [post_big(running.worker_base(i), 1500) for i in range(WORKERS)] == [201] * WORKERS
        assert running.proc.poll() is None
