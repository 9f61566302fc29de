"""The SQLite store's database: its connections opened and closed, reads (point reads on the
loop, lists and counts on reader threads) and readiness (see `SqliteDatabase`)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from herald.errors import HeraldError, Unavailable
from herald.settings import Settings
from herald.store.sqlite.checkpointer import Checkpointer, LoopGate
from herald.store.sqlite.connection import (
    LOCKED,
    Connection,
    migrate,
    parse_url,
    result_code,
    synchronous,
    translated,
)
from herald.store.sqlite.readers import Readers
from herald.store.sqlite.writer import REASONS, RETRY_AFTER_FAILED, RETRY_MAX, SqliteWriter

T = TypeVar("T")

CACHE_KIB = 64 * 1024
READER_CACHE_KIB = 16 * 1024  # each reader's own page cache (the OS caches the file too)
# Waiting on a lock blocks the thread that waits: at open (migrations, nothing is served yet) and
# on reader threads that is fine; the loop's connection never waits (see SqliteWriter).
OPEN_BUSY_MS = 10_000
READER_BUSY_MS = 1_000
UNREADY_AFTER = 1.0  # writes held this long: `ping` (so /readyz) says not ready
PROBE_SECONDS = 1.0  # `ping`'s test write, after a failed one, must finish within this
MIN_FREE = 1024 * 1024  # below this many free bytes after a failure, `ping` does not even try


class SqliteDatabase(SqliteWriter):
    """Writes and point reads on the event loop's own thread, on one connection (`SqliteWriter`);
    lists and counts on reader threads (`readers.py`); checkpoints on a thread of their own
    (`checkpointer.py`).

    Lists and counts leave the loop because one can take a second over a large feed, and on the
    loop that second would stall every other request. After a failed batch, `ping` tries a write
    that changes nothing to learn when writes can succeed again.
    """

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        self.url = url
        base, _, query = url.partition("?")
        self._settings = settings or Settings()
        super().__init__(*parse_url(base), self._settings.sqlite_lock_timeout)
        self._synchronous = synchronous(query)
        self._probe: asyncio.Future[None] | None = None
        self._readers: Readers[Connection] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def _connect(self, busy_ms: int = 0, cache_kib: int = CACHE_KIB) -> Connection:
        conn = Connection(
            self._database, uri=self._uri, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute(f"PRAGMA cache_size = -{cache_kib}")  # keeps index pages hot for the writer
        return conn

    async def open(self) -> None:
        if self._conn is not None:
            return
        with translated():
            conn = self._connect(OPEN_BUSY_MS)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer thread does it
                if self._settings.sqlite_wal_limit:  # see checkpointer.py
                    conn.execute(
                        f"PRAGMA journal_size_limit = {self._settings.sqlite_wal_limit // 2}"
                    )
                migrate(conn)
                conn.execute("PRAGMA busy_timeout = 0")  # from now on, lock waits are timers
            except BaseException:
                conn.close()
                raise
        self._loop = asyncio.get_running_loop()
        self._conn = conn
        # In memory there is no WAL, and a reader would block the writer: both stay inline.
        if not self._uri:
            settings = self._settings
            self._checkpointer = Checkpointer(
                self._connect,
                self._database,
                settings.sqlite_wal_limit,
                LoopGate(self, self._loop),
                self.metrics,
            )
            self._checkpointer.start()
            self.metrics.wal_bytes.set_function(self._checkpointer.wal_bytes)
            self.metrics.disk_free_bytes.set_function(lambda: self._free_bytes() or 0)
            readers = Readers(
                lambda: self._connect(READER_BUSY_MS, READER_CACHE_KIB),
                settings.sqlite_readers,
                settings.sqlite_query_timeout,
                self.metrics,
            )
            with translated():
                readers.open()
            self._readers = readers

    async def close(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)  # its release reaches the loop next
            self._checkpointer = None
        if self._pending:  # queued writes commit, or fail after sqlite_lock_timeout
            await asyncio.wait([call.future for call in self._pending])
        self._conn = None
        if self._readers is not None:
            await self._readers.close()
            self._readers = None
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    # -- reads: point reads on the loop (they take microseconds), lists and counts on readers ---
    async def _read(self, job: Callable[[Connection], T]) -> T:
        deadline: float | None = None
        while True:
            conn = self._conn
            if conn is None:
                raise Unavailable("store is closed")
            try:
                with translated():
                    return _read_in(conn, job)
            except Unavailable as e:
                # Readers rarely wait in WAL mode (another connection recovering the WAL index);
                # when one must, it waits on a timer, like writes.
                if result_code(e) not in LOCKED:
                    raise
                loop = asyncio.get_running_loop()
                deadline = deadline or loop.time() + self._lock_timeout
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(RETRY_MAX)

    async def _long_read(self, user_id: str, job: Callable[[Connection], T]) -> T:
        """A read that can take long (a list, a count): on a reader thread."""
        if self._readers is None:
            return await self._read(job)
        with translated():
            return await self._readers.run(user_id, job)

    async def ping(self) -> None:
        """Reads work, and so do writes: no batch has waited UNREADY_AFTER seconds, and since a
        failed batch a write has succeeded (a no-op one, tried here, if nothing else has)."""
        await self._read(lambda c: c.execute("SELECT 1").fetchone())
        if self._waiting is not None:
            assert self._loop is not None
            reason, since = self._waiting
            waited = self._loop.time() - since
            if waited >= UNREADY_AFTER:
                raise Unavailable(f"writes have waited {waited:.1f} s: {REASONS[reason]}")
        if self._failure is None:
            return
        reason, message, _ = self._failure
        free = self._free_bytes()
        if free is not None and free < MIN_FREE:
            raise Unavailable(f"{message} ({free} bytes free)", retry_after=RETRY_AFTER_FAILED)
        try:
            await self._try_write()
        except (HeraldError, TimeoutError) as e:
            raise Unavailable(message, retry_after=RETRY_AFTER_FAILED) from e

    async def _try_write(self) -> None:
        """A write that changes nothing, shared by concurrent pings."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._write(_touch))
            # Retrieved here so that a probe nobody waits for any more is not reported.
            self._probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.wait_for(asyncio.shield(self._probe), PROBE_SECONDS)


def _touch(c: Connection) -> None:
    """A write that changes nothing (Herald does not use user_version): `ping` tries it after a
    failed batch to learn whether writes succeed again."""
    (version,) = c.execute("PRAGMA user_version").fetchone()
    c.execute(f"PRAGMA user_version = {int(version)}")
    c.touched = True


def _read_in(conn: Connection, job: Callable[[Connection], T]) -> T:
    """One read transaction: a multi-statement read (a list and its count) sees one snapshot.
    Outside `_flush` no write transaction is open on the loop's connection, so this sees
    committed data only."""
    conn.execute("BEGIN")
    try:
        return job(conn)
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
