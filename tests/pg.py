"""PostgreSQL for server-level tests: a fresh schema per use, on HERALD_TEST_POSTGRES_URL; and
a private server (`private_cluster`) for tests that stop or restart it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest


def postgres_url() -> str:
    url = os.environ.get("HERALD_TEST_POSTGRES_URL")
    if not url:
        message = "HERALD_TEST_POSTGRES_URL is not set (run scripts/postgres to get one)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fresh_database() -> Iterator[str]:
    """Yield a store URL whose search_path is a new, empty schema; drop it afterwards.

    asyncpg passes unknown URL query parameters to the server as settings."""
    url = postgres_url()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(url, f"CREATE SCHEMA {schema}"))
    try:
        yield f"{url}{'&' if '?' in url else '?'}search_path={schema}"
    finally:
        asyncio.run(_admin(url, f"DROP SCHEMA {schema} CASCADE"))


def application_url(url: str, name: str) -> str:
    """`url` with `application_name` set, so a test can find (and terminate) only the backends of
    the Herald it started: pg_stat_activity.application_name."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


async def terminate_backends(url: str, application_name: str) -> int:
    """Terminate the backends whose application_name is `application_name` (as a failover, a
    PgBouncer restart or an idle-connection reaper does); returns how many there were."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = $1 AND pid <> pg_backend_pid()",
            application_name,
        )
    finally:
        await conn.close()
    return len(rows)


class Cluster:
    """A private PostgreSQL server (initdb + pg_ctl) that a test may stop, restart or kill without
    touching the shared one. PostgreSQL refuses to run as root, so its commands run as the
    `postgres` user (runuser); its data directory is a fresh directory that user owns."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        self.log = root / "server.log"
        self.bin = _postgres_bin()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
            " -c fsync=off -c shared_buffers=16MB -c max_connections=40"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends every session (as a restart does), `immediate` is a
        crash (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def follow(self, primary: Cluster) -> None:
        """Make this (not initialised) cluster a streaming standby of `primary`: a base backup
        with its connection settings (-R), so that it replicates asynchronously once started."""
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(self.data), "-X", "stream", "-R", "-c", "fast", "--no-sync",
        )  # fmt: skip

    def promote(self) -> None:
        """End recovery (a failover): the standby becomes a primary on a new timeline."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise FileNotFoundError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    return found[-1].parent


def private_cluster() -> Iterator[Cluster]:
    """Yield a running private cluster on a free port; stop and delete it afterwards.

    Its directory is made under /tmp rather than pytest's tmp_path, whose parents only root may
    enter. Skips (fails on CI) where it cannot run: no server binaries, or not root/postgres."""
    _require_private()
    with _made_cluster() as cluster:
        cluster.init()
        cluster.start()
        yield cluster


def replicated_pair() -> Iterator[tuple[Cluster, Cluster]]:
    """Yield a running private primary and its asynchronous streaming standby (each on a free
    port); stop and delete both afterwards, whatever state the test left them in."""
    _require_private()
    with _made_cluster() as primary:
        primary.init()
        primary.start()
        with _made_cluster() as standby:  # its port picked while the primary's is taken
            standby.follow(primary)
            standby.start()
            yield primary, standby


@contextlib.contextmanager
def _made_cluster() -> Iterator[Cluster]:
    """A cluster's directory and port (not initialised); stopped and deleted on the way out."""
    from tests.conftest import free_port

    root = Path(tempfile.mkdtemp(prefix="herald-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = Cluster(root, free_port())
    try:
        yield cluster
    finally:
        if cluster.data.exists() and cluster.running():
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _require_private() -> None:
    try:
        _postgres_bin()
        can_run = os.geteuid() == 0 or pwd.getpwuid(os.geteuid()).pw_name == "postgres"
    except (FileNotFoundError, KeyError):
        can_run = False
    if not can_run:
        message = "a private PostgreSQL needs its server binaries and root (or the postgres user)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class StatementCounter:
    """A TCP proxy in front of PostgreSQL that counts the statements its clients send: simple
    queries ('Q') and extended-protocol executions ('E': preparing one sends none), i.e. the
    round trips a store makes. `in_front_of` starts one and says where to point a store."""

    SPECIAL = (80877103, 80877104)  # SSLRequest, GSSENCRequest: untyped, like the startup

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.statements = 0
        self.server: asyncio.Server | None = None
        # `freeze`: the client's next statements to let through before it stops, as a process
        # stopped by SIGSTOP would (at a message boundary: it writes a statement whole).
        self._let_through: int | None = None
        self._thawed = asyncio.Event()
        self._thawed.set()

    @classmethod
    async def in_front_of(cls, dsn: str) -> tuple[StatementCounter, str]:
        """A started counter in front of the database of `dsn`, and `dsn` through it (the plain
        protocol on the wire, so that the counter can read it)."""
        parts = urlsplit(dsn)
        counter = cls(parts.hostname or "127.0.0.1", parts.port or 5432)
        port = await counter.start()
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        query = parts.query + "&sslmode=disable"
        return counter, urlunsplit((parts.scheme, netloc, parts.path, query, ""))

    def freeze(self, after: int) -> None:
        """Forward `after` more statements (each up to its Sync, or a simple query), then
        nothing from any client until `thaw`."""
        self._let_through = after

    def thaw(self) -> None:
        self._let_through = None
        self._thawed.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        back = asyncio.create_task(_pipe(server_r, client_w))
        try:
            await self._count(client_r, server_w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            server_w.close()
            await back

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        typed = False
        while True:
            await self._thawed.wait()
            kind = b""
            if typed:
                kind = await reader.readexactly(1)
            head = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(head) - 4)
            if not typed:
                typed = int.from_bytes(body[:4]) not in self.SPECIAL  # the startup message
            if kind in (b"Q", b"E"):
                self.statements += 1
            writer.write(kind + head + body)
            await writer.drain()
            if kind in (b"Q", b"S") and self._let_through is not None:
                self._let_through -= 1
                if self._let_through <= 0:
                    self._thawed.clear()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
