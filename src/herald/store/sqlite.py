"""The SQLite store: stdlib `sqlite3`, WAL, group commit on the event loop (see SqliteStore).

URLs follow SQLAlchemy: `sqlite:///relative.db`, `sqlite:////abs/path/herald.db` (so
f"sqlite:///{path}" is right for both), and `sqlite://:memory:` for a private in-memory database.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from herald.errors import Conflict, HeraldError, NotFound, QuotaExceeded, Unavailable
from herald.metrics import SqliteMetrics
from herald.model import (
    App,
    Change,
    ChangeKind,
    Content,
    Delivery,
    NewDelivery,
    Notification,
    Pending,
    Provider,
    Settlement,
    StatePatch,
    Subscription,
)
from herald.query import DEFAULT_ORDER, Filter, Page, Query
from herald.settings import Settings
from herald.store.base import Once, Remembered
from herald.store.checkpointer import Checkpointer
from herald.store.readers import Readers
from herald.store.sql import (
    APP_ORDER,
    APP_SELECT,
    CHANGE_COLUMNS,
    DELETE_APP,
    LIVE_KINDS,
    NOTIFICATION_COLUMNS,
    REPLACED,
    SQLITE,
    SUBSCRIPTION_COLUMNS,
    Claimed,
    CommitHooks,
    app_from_row,
    change_from_row,
    channel_key,
    check_etag,
    check_version,
    decode_channel,
    decode_message,
    encode_channel,
    encode_content,
    encode_message,
    feed_where,
    from_micros,
    migrations,
    new_notification,
    notification_from_row,
    order_by,
    patched,
    pending_from_row,
    provider_of,
    settle_ids,
    settle_plan,
    stored_subscription,
    subscription_from_row,
    to_micros,
)

log = logging.getLogger("herald.store")


class Connection(sqlite3.Connection):
    """The store's connection. `outboxed` counts the outbox rows written by the open transaction,
    so that `_flush` knows whether its commit is one to signal (see `on_commit`); `touched` says
    that it ran `_touch` (a write `total_changes` does not count)."""

    outboxed = 0
    touched = False


T = TypeVar("T")
Job = Callable[[Connection], Any]

CHUNK = 200  # keys per lookup statement in set-wise writes
# Undeliverable deliveries a claim may purge beyond what it returns: bounds one claim's work when
# many are left over (say, from a deleted subscription whose deliveries were queued meanwhile).
PURGE_MAX = 10_000
MAX_HOPS = 4  # loop turns a flush may wait for its batch to stop growing
CACHE_KIB = 64 * 1024
INLINE_ROWS = 2000  # a list in index order reading at most this many rows runs on the loop
READER_CACHE_KIB = 16 * 1024  # each reader's own page cache (the OS caches the file too)
# Waiting on a lock blocks the thread that waits: at open (migrations, nothing is served yet) and
# on reader threads that is fine; the loop's connection never waits (see SqliteStore).
OPEN_BUSY_MS = 10_000
READER_BUSY_MS = 1_000
RETRY_FIRST = 0.001  # a batch that found the write lock taken tries again after this, doubling
RETRY_MAX = 0.05  # up to this (also how often held batches check their deadline)
HOLD_ACK_SECONDS = 5.0  # how long the checkpointer waits for the loop to hold writes
UNREADY_AFTER = 1.0  # writes held this long: `ping` (so /readyz) says not ready
PROBE_SECONDS = 1.0  # `ping`'s test write, after a failed one, must finish within this
RETRY_AFTER_FAILED = 5  # Retry-After (s) while the disk is full or failing
MIN_FREE = 1024 * 1024  # below this many free bytes after a failure, `ping` does not even try
# Result codes that concern the database, not one call: the whole batch fails (rolled back).
BATCH_FAILURES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)
LOCKED = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# Why batches wait or fail, as the metrics and /readyz name it.
REASONS = {
    "checkpoint": "a checkpoint is restarting the WAL",
    "wal_limit": "the WAL is at sqlite_wal_limit and cannot be checkpointed yet",
    "locked": "another process holds the database's write lock",
    "full": "the disk is full",
    "io": "the database cannot be written",
}


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Let only `herald.errors` escape: the one place sqlite3 exceptions are mapped."""
    try:
        yield
    except HeraldError:
        raise
    except sqlite3.IntegrityError as e:
        raise Conflict(f"conflicting record: {e}") from e
    except (sqlite3.OperationalError, sqlite3.DatabaseError, sqlite3.InterfaceError) as e:
        raise Unavailable(f"database unavailable: {e}", retry_after=1) from e


def result_code(e: BaseException) -> int:
    """The primary SQLite result code of an error, or of the one it was translated from."""
    cause = e if isinstance(e, sqlite3.Error) else e.__cause__
    code = getattr(cause, "sqlite_errorcode", None)
    return -1 if code is None else int(code) & 0xFF


def failure_reason(e: BaseException) -> str:
    code = result_code(e)
    return "full" if code == sqlite3.SQLITE_FULL else "locked" if code in LOCKED else "io"


def parse_url(url: str) -> tuple[str, bool]:
    """(database argument for sqlite3.connect, is a URI)."""
    rest = url.removeprefix("sqlite:")
    if rest in ("//:memory:", "///:memory:"):
        # memdb shares one in-memory database between this store's connections by name and,
        # unlike shared-cache mode, uses ordinary locking so busy_timeout applies.
        return f"file:/herald-{uuid.uuid4().hex}?vfs=memdb", True
    if not rest.startswith("///") or len(rest) == 3:
        raise ValueError(f"bad SQLite URL {url!r}: use sqlite:///path or sqlite://:memory:")
    return rest[3:], False


def _synchronous(query: str) -> str:
    """`?synchronous=full` makes every commit fsync the WAL: acknowledged writes then survive
    power loss too, at the price of an fsync per group commit. The default, NORMAL, survives any
    crash of Herald itself but may lose the last commits if the machine loses power."""
    options = dict(p.partition("=")[::2] for p in query.split("&") if p)
    unknown = set(options) - {"synchronous"}
    if unknown:
        raise ValueError(f"unknown SQLite URL option {sorted(unknown)[0]!r}; known: synchronous")
    value = options.get("synchronous", "normal").upper()
    if value not in ("NORMAL", "FULL"):
        raise ValueError("SQLite URL option synchronous must be normal or full")
    return value


@dataclass(slots=True)
class _Call:
    job: Job
    future: asyncio.Future[Any]
    deadline: float  # loop time by which its transaction must have begun, else 503


class _Hold:
    """The checkpointer's request to hold writes; granted on the loop, or abandoned by the
    checkpointer if the loop did not answer in time (then it must not be granted later)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.granted = threading.Event()
        self.abandoned = False


class _Gate:
    """How the checkpointer holds the store's writes (its methods run on the checkpointer
    thread; the store's side runs on the loop)."""

    def __init__(self, store: SqliteStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop

    def hold(self) -> bool:
        request = _Hold()
        try:
            self._loop.call_soon_threadsafe(self._store._hold, request)
        except RuntimeError:  # the loop is closed
            return False
        if request.granted.wait(HOLD_ACK_SECONDS):
            return True
        with request.lock:
            request.abandoned = not request.granted.is_set()
            return not request.abandoned

    def release(self, reset: bool, failure: sqlite3.Error | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
            self._loop.call_soon_threadsafe(self._store._release, reset, failure)


class SqliteStore:
    """Writes and point reads on the event loop's own thread, on one connection; lists and counts
    on reader threads (`readers.py`); checkpoints on a thread of their own (`checkpointer.py`).

    Why not a writer thread: the server is one process, so a thread adds no parallelism, only GIL
    hand-offs (each costs up to the 5 ms switch interval under load) and cross-thread futures.
    SQLite statements take microseconds and a WAL commit with synchronous=NORMAL does not fsync,
    so running them inline is both faster and simpler. Group commit: writes that arrive while the
    loop is busy are queued and committed together by one `_flush` scheduled with call_soon.
    Checkpoints (the only fsyncs) run on a background thread with its own connection, so they
    never stall the loop. Lists and counts are the exception: one can take a second over a large
    feed, and on the loop that second would stall every other request.

    Nothing waits on the loop: its connection has no busy timeout. A batch that finds the write
    lock taken (another process: the CLI, a backup) stays queued and is tried again on asyncio
    timers for up to `sqlite_lock_timeout` seconds, then answered 503 with Retry-After; reads,
    health checks and live streams are served meanwhile. The checkpointer holds batches the same
    way while it restarts the WAL, and they stay held while the WAL is at its limit
    (`checkpointer.py` says why).

    A batch that fails for a reason of the database's, not of one call (a full disk, an I/O
    error), is rolled back whole and each call answered 503 with Retry-After. From then until a
    write succeeds, `ping` (so /readyz) fails; it tries a write that changes nothing to learn
    when writes can succeed again.
    """

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        self.url = url
        base, _, query = url.partition("?")
        self._database, self._uri = parse_url(base)
        self._synchronous = _synchronous(query)
        self._settings = settings or Settings()
        self._lock_timeout = self._settings.sqlite_lock_timeout
        self.metrics = SqliteMetrics()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None  # the next try of a waiting batch
        self._retry = RETRY_FIRST
        self._hops = 0
        self._seen = 0
        self._holds = 0  # checkpoints under way with writes held (see _Gate)
        self._wal_full = False  # the WAL reached its limit: writes wait for a restart
        self._checkpoint_failure: sqlite3.Error | None = None  # why it could not be restarted
        self._waiting: tuple[str, float] | None = None  # (reason, since) while batches wait
        self._failure: tuple[str, str, float] | None = None  # (reason, message, since)
        self._probe: asyncio.Future[None] | None = None
        self._checkpointer: Checkpointer | None = None
        self._readers: Readers[Connection] | None = None
        self._hooks = CommitHooks()

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
                _migrate(conn)
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
                _Gate(self, self._loop),
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

    def _free_bytes(self) -> int | None:
        """Free space for unprivileged users on the database's file system (None in memory)."""
        if self._uri:
            return None
        try:
            fs = os.statvfs(os.path.dirname(os.path.abspath(self._database)))
        except OSError:
            return None
        return fs.f_bavail * fs.f_frsize

    # -- writes: group commit on the loop ------------------------------------------------------
    async def _write(self, job: Callable[[Connection], T]) -> T:
        if self._conn is None:
            raise Unavailable("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append(_Call(job, future, loop.time() + self._lock_timeout))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._hops = 0
            self._seen = 0
            loop.call_soon(self._gather, loop)
        return await future

    def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush once the batch stops growing: requests already read from their sockets reach
        the store a loop turn or two after the first one, and joining them to this commit is
        cheaper than a commit of their own (measured: 26 -> 64 calls per commit under load)."""
        if len(self._pending) > self._seen and self._hops < MAX_HOPS:
            self._seen = len(self._pending)
            self._hops += 1
            loop.call_soon(self._gather, loop)
            return
        self._flush()

    def _flush(self) -> None:
        self._timer = None
        conn = self._conn
        if conn is None:
            self._settle_all(Unavailable("store is closed"))
            return
        reason = self._blocked()
        if reason is None:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                if result_code(e) not in LOCKED:
                    self._settle_all(self._failed(e))
                    return
                reason = "locked"
        if reason is not None:
            self._wait(reason)
            return
        self._waited()
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        outcomes = self._commit(conn, batch)
        for call, (ok, value) in zip(batch, outcomes, strict=True):
            if call.future.done():  # the caller was cancelled; the write still committed
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)
        if conn.outboxed:
            conn.outboxed = 0
            self._hooks.fire()

    def _blocked(self) -> str | None:
        """Why no batch may begin now, if none may."""
        if self._holds:
            return "checkpoint"
        if self._wal_full:
            assert self._checkpointer is not None
            if self._checkpointer.wal_bytes() < self._checkpointer.limit:
                self._wal_full = False
                self._checkpoint_failure = None
            else:
                return "wal_limit"
        return None

    def _wait(self, reason: str) -> None:
        """Keep the batch queued and try again soon; calls past their deadline fail now."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if self._waiting is None or self._waiting[0] != reason:
            self._waited()
            self._waiting = (reason, now)
        failure = self._checkpoint_failure
        if reason == "wal_limit" and failure is not None:
            # The WAL cannot be restarted (say, the disk is full): answer now, not at the deadline.
            self._settle_all(self._failed(failure))
            return
        late = [call for call in self._pending if call.deadline <= now]
        if late:
            self._pending = [call for call in self._pending if call.deadline > now]
            self._settle(late, self._failed(reason))
        if not self._pending:
            self._flush_scheduled = False
            self._waited()
            return
        delay = self._retry if reason == "locked" else RETRY_MAX
        self._retry = min(self._retry * 2, RETRY_MAX)
        self._timer = loop.call_later(delay, self._flush)

    def _waited(self) -> None:
        """The end of a wait: record how long it was."""
        if self._waiting is not None:
            assert self._loop is not None
            reason, since = self._waiting
            self.metrics.write_waits.labels(reason).observe(self._loop.time() - since)
            self._waiting = None
        self._retry = RETRY_FIRST

    def _settle_all(self, error: HeraldError) -> None:
        calls, self._pending = self._pending, []
        self._flush_scheduled = False
        self._waited()
        self._settle(calls, error)

    @staticmethod
    def _settle(calls: builtins.list[_Call], error: HeraldError) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(error)

    def _failed(self, cause: BaseException | str) -> Unavailable:
        """A batch failed for a reason of the database's: count it, log the first of a run of
        failures, and make the error its calls get."""
        reason = cause if isinstance(cause, str) else failure_reason(cause)
        self.metrics.write_failures.labels(reason).inc()
        message = f"Herald cannot write to its database now: {REASONS[reason]}."
        if self._failure is None:
            log.warning(
                "SQLite writes failing: %s",
                REASONS[reason] if isinstance(cause, str) else cause,
                extra={"reason": reason, "free_bytes": self._free_bytes()},
            )
            self._failure = (reason, message, time.monotonic())
        return Unavailable(message, retry_after=1 if reason == "locked" else RETRY_AFTER_FAILED)

    def _succeeded(self) -> None:
        if self._failure is not None:
            reason, _, since = self._failure
            log.info(
                "SQLite writes succeed again after %.1f s",
                time.monotonic() - since,
                extra={"reason": reason},
            )
            self._failure = None
        checkpointer = self._checkpointer
        if checkpointer is None or not checkpointer.limit:
            return
        size = checkpointer.wal_bytes()
        if size > checkpointer.soft:
            checkpointer.request()
            self._wal_full = size >= checkpointer.limit

    # The checkpointer's requests (see _Gate), on the loop: between two flushes, so no write
    # transaction is open when a hold is granted.
    def _hold(self, request: _Hold) -> None:
        with request.lock:
            if not request.abandoned:
                self._holds += 1
                request.granted.set()

    def _release(self, reset: bool, failure: sqlite3.Error | None) -> None:
        self._holds -= 1
        if reset:  # the next write starts the WAL over (and cuts the file back to its soft size)
            self._wal_full = False
            self._checkpoint_failure = None
        elif self._blocked() == "wal_limit" and failure is not None:
            self._checkpoint_failure = failure
        if self._timer is not None:  # a batch waits: try it now
            self._timer.cancel()
            self._flush()

    def _commit(self, conn: Connection, batch: list[_Call]) -> list[tuple[bool, Any]]:
        """One transaction (begun by `_flush`) for the whole batch.

        Fast path: jobs run back to back without savepoints. A job that fails before writing
        anything (NotFound, PreconditionFailed: the common failures) leaves nothing to undo. Only
        if one fails after writing is the batch rolled back to its start and replayed with a
        savepoint per job. A failure of the database's (BATCH_FAILURES) fails every call.
        """
        conn.outboxed = 0
        conn.touched = False
        changes = conn.total_changes
        try:
            with translated():
                conn.execute("SAVEPOINT batch")
                outcomes = self._run_batch(conn, batch, savepoints=False)
                if outcomes is None:
                    conn.execute("ROLLBACK TO batch")
                    conn.outboxed = 0
                    outcomes = self._run_batch(conn, batch, savepoints=True)
                    assert outcomes is not None
                conn.execute("COMMIT")
        except Exception as e:
            conn.outboxed = 0
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = self._failed(e) if result_code(e) in BATCH_FAILURES else e
            return [(False, error)] * len(batch)
        # Only a commit that wrote says writes work: one that changed nothing (a claim that
        # found no due push) appends nothing to the WAL, and succeeds on a full disk too.
        if conn.total_changes != changes or conn.touched:
            self._succeeded()
        return outcomes

    @staticmethod
    def _run_batch(
        conn: Connection, batch: list[_Call], savepoints: bool
    ) -> builtins.list[tuple[bool, Any]] | None:
        outcomes: builtins.list[tuple[bool, Any]] = []
        i = 0
        while i < len(batch):
            if savepoints:
                outcomes.append(_in_savepoint(conn, batch[i].job))
                i += 1
                continue
            # A run of puts (the common case under load) is written set-wise: a handful of
            # statements for the whole run instead of four per notification.
            j = i
            while j < len(batch) and isinstance(batch[j].job, _Put):
                j += 1
            if j - i > 1:
                puts = [call.job for call in batch[i:j]]
                try:
                    with translated():
                        outcomes += [(True, r) for r in _put_many(conn, puts)]  # type: ignore[arg-type]
                except Exception as e:
                    _raise_if_batch_failure(conn, e)
                    return None  # replay the batch one call at a time, with savepoints
                i = j
                continue
            before = conn.total_changes
            try:
                with translated():
                    outcomes.append((True, batch[i].job(conn)))
            except Exception as e:
                _raise_if_batch_failure(conn, e)
                if conn.total_changes != before:
                    return None  # partial writes: replay the batch with savepoints
                outcomes.append((False, e))
            i += 1
        return outcomes

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

    # -- apps ----------------------------------------------------------------------------------
    async def add_app(self, app: App) -> None:
        def job(c: Connection) -> None:
            try:
                c.execute(
                    "INSERT INTO apps VALUES (?, ?, ?)",
                    (app.host_name, app.display_name, to_micros(app.created_date_time)),
                )
                _insert_client(c, app)
            except sqlite3.IntegrityError as e:
                raise Conflict("an app with this client id or host name exists") from e

        await self._write(job)

    async def add_client(self, app: App) -> None:
        def job(c: Connection) -> None:
            if c.execute("SELECT 1 FROM apps WHERE host_name = ?", (app.host_name,)).fetchone():
                try:
                    _insert_client(c, app)
                except sqlite3.IntegrityError as e:
                    raise Conflict(f"the client id {app.client_id!r} is taken") from e
            else:
                raise NotFound(f"no app with host name {app.host_name!r}")

        await self._write(job)

    async def remove_client(self, client_id: str) -> None:
        def job(c: Connection) -> None:
            row = c.execute(
                "SELECT (SELECT count(*) FROM app_clients AS o WHERE o.host_name = a.host_name)"
                " FROM app_clients AS a WHERE a.client_id = ?",
                (client_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no client id {client_id!r}")
            if row[0] < 2:
                raise Conflict(LAST_CLIENT)
            c.execute("DELETE FROM app_clients WHERE client_id = ?", (client_id,))

        await self._write(job)

    async def set_client_secret(self, client_id: str, secret_hash: str) -> None:
        def job(c: Connection) -> None:
            done = c.execute(
                "UPDATE app_clients SET secret_hash = ? WHERE client_id = ?",
                (secret_hash, client_id),
            )
            if done.rowcount == 0:
                raise NotFound(f"no client id {client_id!r}")

        await self._write(job)

    async def get_app(self, client_id: str) -> App | None:
        rows = await self._read(
            lambda c: c.execute(f"{APP_SELECT} WHERE c.client_id = ?", (client_id,)).fetchall()
        )
        return app_from_row(rows[0], from_micros) if rows else None

    async def list_apps(self) -> list[App]:
        rows = await self._read(lambda c: c.execute(APP_SELECT + APP_ORDER).fetchall())
        return [app_from_row(r, from_micros) for r in rows]

    async def delete_app(self, host_name: str) -> dict[str, int] | None:
        return await self._write(lambda c: _delete_app(c, host_name))

    # -- user principal names ------------------------------------------------------------------
    async def user_of(self, upn: str) -> str | None:
        row = await self._read(
            lambda c: c.execute("SELECT user_id FROM user_names WHERE upn = ?", (upn,)).fetchone()
        )
        return None if row is None else str(row[0])

    async def name_user(self, upn: str, user_id: str, pinned: bool, now: datetime) -> bool:
        def job(c: Connection) -> bool:
            c.execute(
                "INSERT INTO user_names VALUES (?1, ?2, ?3, ?4) ON CONFLICT (upn) DO UPDATE"
                " SET user_id = ?2, pinned = ?3, updated = ?4 WHERE ?3 OR user_id = ?2",
                (upn, user_id, int(pinned), to_micros(now)),
            )
            row = c.execute("SELECT user_id FROM user_names WHERE upn = ?", (upn,)).fetchone()
            return bool(row[0] == user_id)

        return await self._write(job)

    async def forget_user_name(self, upn: str) -> bool:
        return await self._write(
            lambda c: c.execute("DELETE FROM user_names WHERE upn = ?", (upn,)).rowcount > 0
        )

    async def list_user_names(self) -> list[tuple[str, str, bool]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT upn, user_id, pinned FROM user_names ORDER BY upn"
            ).fetchall()
        )
        return [(r[0], r[1], bool(r[2])) for r in rows]

    # -- notifications -------------------------------------------------------------------------
    async def put(
        self,
        user_id: str,
        app: str,
        content: Content,
        new_id: str,
        now: datetime,
        origin: str | None = None,
    ) -> tuple[Notification, bool]:
        result = await self._write(_Put(user_id, app, content, new_id, now, origin))
        return cast(tuple[Notification, bool], result)  # a put without a key

    async def put_once(
        self,
        user_id: str,
        app: str,
        content: Content,
        new_id: str,
        now: datetime,
        once: Once,
        origin: str | None = None,
    ) -> Remembered:
        result = await self._write(_Put(user_id, app, content, new_id, now, origin, once))
        return cast(Remembered, result)  # a put with a key

    async def get(self, user_id: str, app: str, id: str, now: datetime) -> Notification | None:
        return await self._read(lambda c: _live(c, user_id, app, id, to_micros(now)))

    async def list(self, user_id: str, app: str, query: Query, now: datetime) -> Page:
        def job(c: Connection) -> Page:
            where, params = feed_where(SQLITE, user_id, app, query.filter, now)
            rows = c.execute(
                f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE {where}"
                f" ORDER BY {order_by(query.order)} LIMIT ? OFFSET ?",
                [*params, query.top, query.skip],
            ).fetchall()
            total = None
            if query.count:
                counted = c.execute(f"SELECT count(*) FROM notifications WHERE {where}", params)
                total = int(counted.fetchone()[0])
            return Page([notification_from_row(r, from_micros) for r in rows], total)

        if _bounded(query):
            return await self._read(job)
        return await self._long_read(user_id, job)

    async def count(self, user_id: str, app: str, filter: Filter | None, now: datetime) -> int:
        where, params = feed_where(SQLITE, user_id, app, filter, now)
        sql = f"SELECT count(*) FROM notifications WHERE {where}"
        return int(await self._long_read(user_id, lambda c: c.execute(sql, params).fetchone()[0]))

    async def update(
        self,
        user_id: str,
        app: str,
        id: str,
        patch: StatePatch,
        if_match: int | None,
        now: datetime,
        origin: str | None = None,
    ) -> Notification:
        return await self._write(
            lambda c: _update(c, user_id, app, id, patch, if_match, now, origin)
        )

    async def delete(
        self,
        user_id: str,
        app: str,
        id: str,
        if_match: int | None,
        now: datetime,
        origin: str | None = None,
    ) -> None:
        def job(c: Connection) -> None:
            n = _live(c, user_id, app, id, to_micros(now))
            if n is None:
                raise NotFound(f"notification {id} not found")
            check_etag(n, if_match)
            _remove(c, n.user_id, n.app, n.id, ChangeKind.DELETED, to_micros(now), origin)

        await self._write(job)

    async def delete_group(
        self, user_id: str, app: str, group_name: str, now: datetime, origin: str | None = None
    ) -> int:
        def job(c: Connection) -> int:
            at = to_micros(now)
            ids = c.execute(
                "SELECT id FROM notifications WHERE user_id = ? AND app = ? AND group_name = ?"
                " AND expiration_date_time > ? ORDER BY created_date_time, id",
                (user_id, app, group_name, at),
            ).fetchall()
            for (nid,) in ids:
                _remove(c, user_id, app, nid, ChangeKind.DELETED, at, origin)
            return len(ids)

        return await self._write(job)

    # -- change log ----------------------------------------------------------------------------
    async def changes(
        self, user_id: str, app: str | None, after: int, limit: int
    ) -> builtins.list[Change]:
        def job(c: Connection) -> builtins.list[Change]:
            params: list[object] = [to_micros(datetime.now(UTC)), user_id, after]
            app_clause = ""
            if app is not None:
                app_clause = " AND c.app = ?"
                params.append(app)
            params.append(limit)
            rows = c.execute(_CHANGES_SQL.format(app_clause=app_clause), params).fetchall()
            return [change_from_row(user_id, r, from_micros) for r in rows]

        return await self._read(job)

    async def horizon(self, user_id: str) -> tuple[int, int]:
        row = await self._read(
            lambda c: c.execute(
                "SELECT coalesce((SELECT pruned FROM feed_heads WHERE user_id = ?1), 0),"
                " max(coalesce((SELECT max(position) FROM changes WHERE user_id = ?1), 0),"
                " coalesce((SELECT position FROM feed_heads WHERE user_id = ?1), 0))",
                (user_id,),
            ).fetchone()
        )
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def sweep(self, now: datetime, retain_changes_until: datetime, limit: int) -> int:
        return await self._write(lambda c: _sweep(c, now, retain_changes_until, limit))

    # -- outbox --------------------------------------------------------------------------------
    async def pending(self, limit: int) -> builtins.list[Pending]:
        rows = await self._read(
            lambda c: c.execute(_PENDING_SQL, (to_micros(datetime.now(UTC)), limit)).fetchall()
        )
        return [pending_from_row(r, from_micros) for r in rows]

    async def dispatched(self, seqs: Sequence[int], deliveries: Sequence[NewDelivery] = ()) -> None:
        """In the write transaction (which excludes every other writer, other processes on the
        file included): see which entries are still there, remove them, supersede for those,
        and queue only the deliveries of those."""
        if not seqs:
            return  # no entry removed: no delivery may be queued
        keys = json.dumps(list(seqs))
        created = to_micros(datetime.now(UTC))
        rows = [
            (
                d.subscription_id,
                d.user_id,
                d.app,
                d.provider,
                encode_message(d.message),
                d.message.notification_id,
                d.message.position,
                to_micros(d.message.expires),
                to_micros(d.due),
                created,
            )
            for d in deliveries
        ]
        changes = [(r[1], r[6]) for r in rows]

        def job(c: Connection) -> None:
            removed = c.execute(_OUTBOX_FIND_SQL, (keys,)).fetchall()
            if not removed:
                return
            c.execute(_OUTBOX_REMOVE_SQL, (keys,))
            c.executemany(_SUPERSEDE_SQL, [r for r in removed if r[2] is not None])
            mine = {(r[0], r[1]) for r in removed}
            if mine.issuperset(changes):
                c.executemany(_DELIVERY_INSERT_SQL, rows)
            else:  # some entries were gone: queue for the rest only
                c.executemany(_DELIVERY_INSERT_SQL, [r for r in rows if (r[1], r[6]) in mine])

        await self._write(job)

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._hooks.add(callback)

    # -- subscriptions -------------------------------------------------------------------------
    async def add_subscription(
        self, sub: Subscription, limit: int, now: datetime
    ) -> tuple[Subscription, bool]:
        return await self._write(lambda c: _add_subscription(c, sub, limit, to_micros(now)))

    async def get_subscription(self, id: str, now: datetime) -> Subscription | None:
        return await self._read(lambda c: _live_subscription(c, id, to_micros(now)))

    async def channel_holder(self, app: str, key: str) -> Subscription | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
                " WHERE app = ? AND channel_key = ?",
                (app, key),
            ).fetchone()
        )
        return None if row is None else subscription_from_row(row, from_micros)

    async def list_subscriptions(
        self, user_id: str, app: str, now: datetime
    ) -> builtins.list[Subscription]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = ? AND app = ?"
                " AND expiration_date_time > ? ORDER BY created_date_time, id",
                (user_id, app, to_micros(now)),
            ).fetchall()
        )
        return [subscription_from_row(r, from_micros) for r in rows]

    async def update_subscription(self, sub: Subscription, now: datetime) -> Subscription:
        return await self._write(lambda c: _update_subscription(c, sub, to_micros(now)))

    async def delete_subscription(self, user_id: str, app: str, id: str) -> None:
        # The protocol passes no `now`: liveness is judged by the clock, as `changes` does.
        at = to_micros(datetime.now(UTC))

        def job(c: Connection) -> None:
            deleted = c.execute(
                "DELETE FROM subscriptions WHERE id = ? AND user_id = ? AND app = ?"
                " AND expiration_date_time > ?",
                (id, user_id, app, at),
            ).rowcount
            if not deleted:
                raise NotFound(f"subscription {id} not found")
            c.execute("DELETE FROM deliveries WHERE subscription_id = ?", (id,))

        await self._write(job)

    async def push_targets(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> builtins.list[Subscription]:
        if not pairs:
            return []
        keys = json.dumps(sorted(set(pairs)))
        rows = await self._read(
            lambda c: c.execute(_PUSH_TARGETS_SQL, (keys, to_micros(now))).fetchall()
        )
        return [subscription_from_row(r, from_micros) for r in rows]

    async def seen(self, subscription_id: str, position: int) -> None:
        def job(c: Connection) -> None:
            c.execute(
                "UPDATE subscriptions SET seen_position = ?2 WHERE id = ?1 AND seen_position < ?2",
                (subscription_id, position),
            )

        await self._write(job)

    # -- deliveries ----------------------------------------------------------------------------
    async def claim(
        self, provider: Provider, now: datetime, lease: float, limit: int
    ) -> builtins.list[Delivery]:
        if limit <= 0:
            return []
        at = to_micros(now)
        until = to_micros(now + timedelta(seconds=lease))
        return await self._write(lambda c: _claim(c, provider, at, until, limit))

    async def settle(self, outcomes: Sequence[Settlement], now: datetime) -> None:
        if not outcomes:
            return
        at = to_micros(now)
        await self._write(lambda c: _settle(c, outcomes, at))

    async def next_due(self, provider: Provider) -> datetime | None:
        (due,) = await self._read(
            lambda c: c.execute(
                "SELECT min(due) FROM deliveries WHERE provider = ?", (provider,)
            ).fetchone()
        )
        return None if due is None else from_micros(due)

    async def count_deliveries(self, provider: Provider | None = None) -> int:
        sql = "SELECT count(*) FROM deliveries"
        params: tuple[str, ...] = ()
        if provider is not None:
            sql, params = f"{sql} WHERE provider = ?", (provider,)
        (count,) = await self._read(lambda c: c.execute(sql, params).fetchone())
        return int(count)

    # -- push credentials ----------------------------------------------------------------------
    async def get_push_credentials(self, app: str) -> dict[str, bytes]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT kind, secret FROM push_credentials WHERE app = ?", (app,)
            ).fetchall()
        )
        return {kind: bytes(secret) for kind, secret in rows}

    async def put_push_credentials(
        self, app: str, kind: str, secret: bytes, replace: bool = True
    ) -> bytes:
        updated = to_micros(datetime.now(UTC))
        conflict = (
            "DO UPDATE SET secret = excluded.secret, updated = excluded.updated"
            if replace
            else "DO NOTHING"
        )

        def job(c: Connection) -> bytes:
            c.execute(
                "INSERT INTO push_credentials (app, kind, secret, updated) VALUES (?, ?, ?, ?)"
                f" ON CONFLICT (app, kind) {conflict}",
                (app, kind, secret, updated),
            )
            (stored,) = c.execute(
                "SELECT secret FROM push_credentials WHERE app = ? AND kind = ?", (app, kind)
            ).fetchone()
            return bytes(stored)

        return await self._write(job)

    async def delete_push_credentials(self, app: str, kind: str) -> bool:
        def job(c: Connection) -> bool:
            return bool(
                c.execute(
                    "DELETE FROM push_credentials WHERE app = ? AND kind = ?", (app, kind)
                ).rowcount
            )

        return await self._write(job)

    # -- idempotency ---------------------------------------------------------------------------
    async def recall(self, scope: str, key: str, now: datetime) -> Remembered | None:
        row = await self._read(
            lambda c: c.execute(_RECALL_SQL, (scope, key, to_micros(now))).fetchone()
        )
        return None if row is None else Remembered(row[0], row[1], bytes(row[2]), row[3])

    async def remember(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        status: int,
        body: bytes,
        location: str | None,
        expires: datetime,
    ) -> None:
        def job(c: Connection) -> None:
            # Keep the first answer unless it has expired (the sweeper may not have run yet).
            c.execute(
                _RECORD_SQL,
                (
                    scope,
                    key,
                    fingerprint,
                    status,
                    body,
                    location,
                    to_micros(expires),
                    to_micros(datetime.now(UTC)),
                ),
            )

        await self._write(job)


# -- migrations --------------------------------------------------------------------------------


LAST_CLIENT = "this is the app's last client id: remove the app instead (herald app delete)"


def _insert_client(c: Connection, app: App) -> None:
    c.execute(
        "INSERT INTO app_clients VALUES (?, ?, ?, ?, ?)",
        (
            app.client_id,
            app.host_name,
            app.platform,
            app.secret_hash,
            to_micros(app.created_date_time),
        ),
    )


def _delete_app(c: Connection, host_name: str) -> dict[str, int] | None:
    if c.execute("SELECT 1 FROM apps WHERE host_name = ?", (host_name,)).fetchone() is None:
        return None
    # A user's next position is max(log, head) + 1: raise the head past the changes removed.
    c.execute(
        "INSERT INTO feed_heads (user_id, position) SELECT user_id, max(position) FROM changes"
        " WHERE app = ? GROUP BY user_id ON CONFLICT (user_id)"
        " DO UPDATE SET position = max(position, excluded.position)",
        (host_name,),
    )
    counts = {}
    for kind, statement in DELETE_APP:
        counts[kind] = c.execute(statement.format(p="?"), (host_name,)).rowcount
    del counts["apps"]
    return counts


def _migrate(conn: Connection) -> None:
    """Apply newer migrations in one transaction; the write lock keeps other processes out."""
    known = migrations("sqlite")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        check_version(current, known[-1][0] if known else 0)
        for version, script in known:
            if version > current:
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (executescript would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        yield buffer


# -- write jobs (run on the loop, in the batch's transaction) -----------------------------------


def _raise_if_batch_failure(conn: Connection, e: Exception) -> None:
    """A failure of the database's, not of this call's (a full disk), or one after which SQLite
    rolled the transaction back by itself, ends the batch: nothing after it may run outside the
    transaction."""
    if not conn.in_transaction or result_code(e) in BATCH_FAILURES:
        raise e


def _bounded(query: Query) -> bool:
    """A list whose cost does not grow with the feed: no filter, no count, in the feed index's
    order, rows near its start. Run inline: a reader thread would cost it more than it takes
    (measured on the shared 2-core machine: a 10-item page at 16 connections served through a
    reader answered about a quarter fewer requests/s)."""
    return (
        query.filter is None
        and not query.count
        and query.order == DEFAULT_ORDER
        and query.skip + query.top <= INLINE_ROWS
    )


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


def _in_savepoint(conn: Connection, job: Job) -> tuple[bool, Any]:
    conn.execute("SAVEPOINT call")
    outboxed = conn.outboxed
    try:
        with translated():
            result = job(conn)
    except Exception as e:
        _raise_if_batch_failure(conn, e)
        conn.execute("ROLLBACK TO call")
        conn.execute("RELEASE call")
        conn.outboxed = outboxed
        return False, e
    conn.execute("RELEASE call")
    return True, result


def _append(
    c: Connection,
    user_id: str,
    kind: str,
    app: str,
    nid: str,
    at: int,
    origin: str | None = None,
) -> None:
    """Append one change at the user's next position (the writer holds the database lock).
    `kind`: a ChangeKind, or REPLACED."""
    (position,) = c.execute(
        _APPEND_SQL, (user_id, user_id, user_id, str(kind), app, nid, at, origin)
    ).fetchone()
    _outbox(c, [(user_id, position)])


# max(log, pruned head) + 1: gap-free because the single writer holds the database lock.
_APPEND_SQL = (
    f"INSERT INTO changes (user_id, {', '.join(CHANGE_COLUMNS)}) VALUES (?, 1 + max("
    "coalesce((SELECT max(position) FROM changes WHERE user_id = ?), 0),"
    " coalesce((SELECT position FROM feed_heads WHERE user_id = ?), 0)), ?, ?, ?, ?, ?)"
    " RETURNING position"
)


def _outbox(c: Connection, entries: builtins.list[tuple[str, int]]) -> None:
    """Outbox rows for changes just appended, in position order: the rowids they get ascend."""
    c.executemany("INSERT INTO outbox (user_id, position) VALUES (?, ?)", entries)
    c.outboxed += len(entries)


def _remove(
    c: Connection,
    user_id: str,
    app: str,
    nid: str,
    kind: ChangeKind,
    at: int,
    origin: str | None = None,
) -> None:
    c.execute("DELETE FROM notifications WHERE id = ?", (nid,))
    _append(c, user_id, kind, app, nid, at, origin)


@dataclass(slots=True)
class _Put:
    """A queued `put` (or `put_once`): callable as a write job, or written set-wise with its
    neighbours."""

    user_id: str
    app: str
    content: Content
    new_id: str
    now: datetime
    origin: str | None = None
    once: Once | None = None

    def __call__(self, c: Connection) -> tuple[Notification, bool] | Remembered:
        once = self.once
        if once is not None:
            recorded = _recorded(c, once, self.now)
            if recorded is not None:
                return recorded
        n, created = _put(
            c, self.user_id, self.app, self.content, self.new_id, self.now, self.origin
        )
        if once is None:
            return n, created
        answer = once.render(n, created)
        c.execute(_RECORD_SQL, _record(once, answer, self.now))
        return answer


def _recorded(c: Connection, once: Once, now: datetime) -> Remembered | None:
    """The unexpired record of the key. Authoritative: the write lock is held (BEGIN IMMEDIATE),
    so no other process can add one before this transaction ends."""
    row = c.execute(_RECALL_SQL, (once.scope, once.key, to_micros(now))).fetchone()
    return None if row is None else Remembered(row[0], row[1], bytes(row[2]), row[3])


def _record(once: Once, answer: Remembered, now: datetime) -> tuple[object, ...]:
    return (
        once.scope,
        once.key,
        answer.fingerprint,
        answer.status,
        answer.body,
        answer.location,
        to_micros(once.expires),
        to_micros(now),
    )


_RECALL_SQL = (
    "SELECT fingerprint, status, body, location FROM idempotency"
    " WHERE scope = ? AND key = ? AND expires > ?"
)
# Keeps an unexpired record (the first answer); replaces an expired one the sweeper has not
# removed yet.
_RECORD_SQL = (
    "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " status = excluded.status, body = excluded.body, location = excluded.location,"
    " expires = excluded.expires WHERE idempotency.expires <= ?"
)


def _put_many(c: Connection, puts: builtins.list[_Put]) -> builtins.list[Any]:
    """Several puts with the semantics of running each `_Put` in order, in ~5 statements (and
    one lookup per Idempotency-Key)."""
    live = _existing(c, puts)
    next_position = _next_positions(c, {p.user_id for p in puts})
    expired: builtins.list[tuple[str]] = []
    inserts: builtins.list[tuple[object, ...]] = []
    updates: builtins.list[tuple[object, ...]] = []
    changes: builtins.list[tuple[str, int, str, str, str, int, str | None]] = []
    records: builtins.list[tuple[object, ...]] = []
    answered: dict[tuple[str, str], Remembered] = {}  # keys recorded by this run
    results: builtins.list[Any] = []

    def log(
        user_id: str, kind: str, app: str, nid: str, at: int, origin: str | None = None
    ) -> None:
        position = next_position[user_id]
        next_position[user_id] = position + 1
        changes.append((user_id, position, str(kind), app, nid, at, origin))

    for p in puts:
        once = p.once
        if once is not None:
            recorded = answered.get((once.scope, once.key)) or _recorded(c, once, p.now)
            if recorded is not None:
                results.append(recorded)
                continue
        now = p.now.astimezone(UTC)
        at = to_micros(now)
        key = (p.user_id, p.app, p.content.app_notification_id or p.new_id)
        old = live.get(key) if p.content.app_notification_id is not None else None
        if old is not None and old.expiration_date_time <= now:
            expired.append((old.id,))
            log(p.user_id, ChangeKind.EXPIRED, p.app, old.id, at)
            old = None
        n = new_notification(p.user_id, p.app, p.content, p.new_id, now, old)
        (inserts if old is None else updates).append(_row(n))
        kind = ChangeKind.CREATED if old is None else REPLACED
        log(p.user_id, kind, p.app, n.id, at, p.origin)
        live[key] = n
        if once is None:
            results.append((n, old is None))
            continue
        answer = answered[once.scope, once.key] = once.render(n, old is None)
        records.append(_record(once, answer, p.now))
        results.append(answer)
    # Order matters: a key can be expired, then created, then replaced within one run.
    c.executemany("DELETE FROM notifications WHERE id = ?", expired)
    c.executemany(_INSERT_SQL, inserts)
    c.executemany(_UPDATE_SQL, updates)
    c.executemany(_LOG_SQL, changes)
    if records:
        c.executemany(_RECORD_SQL, records)
    # One executemany (one prepared statement stepped per row, in C) is as set-wise as SQLite
    # gets: a multi-row VALUES saves ~0.3 us a row but is prepared again for every batch size.
    _outbox(c, [(change[0], change[1]) for change in changes])
    return results


_LOG_SQL = (
    "INSERT INTO changes (user_id, position, kind, app, notification_id, at, origin)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _existing(c: Connection, puts: builtins.list[_Put]) -> dict[tuple[str, str, str], Notification]:
    keys = [
        (p.user_id, p.app, p.content.app_notification_id)
        for p in puts
        if p.content.app_notification_id is not None
    ]
    found: dict[tuple[str, str, str], Notification] = {}
    # OR of equalities, not a row-value IN (VALUES …): SQLite plans the latter as a table scan.
    # Chunked because each OR term deepens the expression tree (SQLite caps the depth at 1000).
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        where = " OR ".join(["(user_id = ? AND app = ? AND app_notification_id = ?)"] * len(chunk))
        rows = c.execute(
            f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE {where}",
            [v for key in chunk for v in key],
        ).fetchall()
        for r in rows:
            n = notification_from_row(r, from_micros)
            found[(n.user_id, n.app, n.app_notification_id)] = n
    return found


def _next_positions(c: Connection, users: set[str]) -> dict[str, int]:
    """Each user's next change position: max(log, pruned head) + 1, in one statement.

    One correlated max() per user: SQLite answers each from the end of the primary-key index
    (a GROUP BY over the users' rows would read every change they ever had).
    """
    rows = c.execute(_POSITIONS_SQL, (json.dumps(sorted(users)),)).fetchall()
    return {user_id: max(logged or 0, pruned or 0) + 1 for user_id, logged, pruned in rows}


_POSITIONS_SQL = (
    "SELECT u.value, (SELECT max(position) FROM changes WHERE user_id = u.value),"
    " (SELECT position FROM feed_heads WHERE user_id = u.value) FROM json_each(?) AS u"
)


def _put(
    c: Connection,
    user_id: str,
    app: str,
    content: Content,
    new_id: str,
    now: datetime,
    origin: str | None = None,
) -> tuple[Notification, bool]:
    now = now.astimezone(UTC)
    at = to_micros(now)
    anid = content.app_notification_id or new_id
    old = None
    if content.app_notification_id is not None:
        row = c.execute(
            f"SELECT {NOTIFICATION_COLUMNS} FROM notifications"
            " WHERE user_id = ? AND app = ? AND app_notification_id = ?",
            (user_id, app, anid),
        ).fetchone()
        old = None if row is None else notification_from_row(row, from_micros)
    if old is not None and old.expiration_date_time <= now:
        _remove(c, user_id, app, old.id, ChangeKind.EXPIRED, at)
        old = None
    n = new_notification(user_id, app, content, new_id, now, old)
    # A plain INSERT for a new row: a colliding id must fail, not overwrite another row.
    c.execute(_INSERT_SQL if old is None else _UPDATE_SQL, _row(n))
    kind = ChangeKind.CREATED if old is None else REPLACED
    _append(c, user_id, kind, app, n.id, at, origin)
    return n, old is None


def _update(
    c: Connection,
    user_id: str,
    app: str,
    id: str,
    patch: StatePatch,
    if_match: int | None,
    now: datetime,
    origin: str | None,
) -> Notification:
    now = now.astimezone(UTC)
    old = _live(c, user_id, app, id, to_micros(now))
    if old is None:
        raise NotFound(f"notification {id} not found")
    check_etag(old, if_match)
    n = patched(old, patch, now)
    c.execute(_UPDATE_SQL, _row(n))
    _append(c, user_id, ChangeKind.UPDATED, app, n.id, to_micros(now), origin)
    return n


def _sweep(c: Connection, now: datetime, retain_until: datetime, limit: int) -> int:
    at = to_micros(now)
    expired = c.execute(
        "SELECT id, user_id, app FROM notifications WHERE expiration_date_time <= ?"
        " ORDER BY expiration_date_time LIMIT ?",
        (at, limit),
    ).fetchall()
    for nid, user_id, app in expired:
        _remove(c, user_id, app, nid, ChangeKind.EXPIRED, at)
    # Prune whole prefixes of each log, so everything at or below `pruned` is gone.
    horizons = c.execute(
        "SELECT user_id, max(position) FROM changes WHERE at < ? GROUP BY user_id",
        (to_micros(retain_until),),
    ).fetchall()
    for user_id, position in horizons:
        c.execute(
            "INSERT INTO feed_heads (user_id, position, pruned) VALUES (?1, ?2, ?2)"
            " ON CONFLICT (user_id) DO UPDATE SET position = max(position, ?2),"
            " pruned = max(pruned, ?2)",
            (user_id, position),
        )
        c.execute("DELETE FROM changes WHERE user_id = ? AND position <= ?", (user_id, position))
    if horizons:
        # Entries whose change was pruned can no longer be announced (a device that missed them
        # is behind the horizon and must resync anyway). The outbox is normally near empty, so
        # one scan beats an index every append would pay for.
        c.execute(
            "DELETE FROM outbox WHERE NOT EXISTS (SELECT 1 FROM changes c"
            " WHERE c.user_id = outbox.user_id AND c.position = outbox.position)"
        )
    swept = c.execute(
        "DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
        " WHERE expiration_date_time <= ? ORDER BY expiration_date_time LIMIT ?) RETURNING id",
        (at, limit),
    ).fetchall()
    _delete_deliveries_of(c, swept)
    c.execute("DELETE FROM idempotency WHERE expires <= ?", (at,))
    return len(expired)


# -- subscription jobs -------------------------------------------------------------------------


def _add_subscription(
    c: Connection, sub: Subscription, limit: int, at: int
) -> tuple[Subscription, bool]:
    key = channel_key(sub)
    holder = None if key is None else _channel_holder(c, sub.app, key)
    if (
        holder is not None
        and holder.user_id == sub.user_id
        and to_micros(holder.expiration_date_time) > at
    ):
        stored = stored_subscription(sub, holder)  # the same device again: update it in place
        c.execute(_SUBSCRIPTION_UPDATE_SQL, (*_subscription_row(stored), True))
        return stored, False
    # Checked before any write, so a refused call leaves nothing to roll back.
    (live,) = c.execute(
        "SELECT count(*) FROM subscriptions WHERE user_id = ? AND app = ?"
        " AND expiration_date_time > ?",
        (sub.user_id, sub.app, at),
    ).fetchone()
    if live >= limit:
        raise QuotaExceeded(f"at most {limit} subscriptions per user and app")
    if holder is not None:  # another user's, or expired: the channel now belongs to `sub`
        c.execute("DELETE FROM subscriptions WHERE id = ?", (holder.id,))
        _delete_deliveries_of(c, [(holder.id,)])
    stored = stored_subscription(sub)
    c.execute(_SUBSCRIPTION_INSERT_SQL, _subscription_row(stored))
    return stored, True


def _update_subscription(c: Connection, sub: Subscription, at: int) -> Subscription:
    old = _live_subscription(c, sub.id, at)
    if old is None or (old.user_id, old.app) != (sub.user_id, sub.app):
        raise NotFound(f"subscription {sub.id} not found")
    key = channel_key(sub)
    if key is not None:
        released = c.execute(
            "DELETE FROM subscriptions WHERE app = ? AND channel_key = ? AND id <> ? RETURNING id",
            (sub.app, key, sub.id),
        ).fetchall()
        _delete_deliveries_of(c, released)
    # A new channel starts with a fresh delivery state; the same one keeps its history.
    reset = key != channel_key(old)
    stored = stored_subscription(sub, old, reset)
    c.execute(_SUBSCRIPTION_UPDATE_SQL, (*_subscription_row(stored), reset))
    return stored


def _delete_deliveries_of(c: Connection, subscriptions: builtins.list[Any]) -> None:
    """Delete the deliveries of these subscriptions (rows of one column: the id)."""
    c.executemany("DELETE FROM deliveries WHERE subscription_id = ?", subscriptions)


def _channel_holder(c: Connection, app: str, key: str) -> Subscription | None:
    """The subscription holding a push channel of the app, expired or not."""
    row = c.execute(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE app = ? AND channel_key = ?",
        (app, key),
    ).fetchone()
    return None if row is None else subscription_from_row(row, from_micros)


def _live_subscription(c: Connection, id: str, at: int) -> Subscription | None:
    row = c.execute(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
        " WHERE id = ? AND expiration_date_time > ?",
        (id, at),
    ).fetchone()
    return None if row is None else subscription_from_row(row, from_micros)


def _subscription_row(s: Subscription) -> tuple[object, ...]:
    return (
        s.id,
        s.user_id,
        s.app,
        s.platform,
        s.display_name,
        encode_channel(s.push_channel),
        channel_key(s),
        to_micros(s.expiration_date_time),
        to_micros(s.created_date_time),
        to_micros(s.last_modified_date_time),
    )


_SUBSCRIPTION_INSERT_SQL = (
    "INSERT INTO subscriptions (id, user_id, app, platform, display_name, push_channel,"
    " channel_key, expiration_date_time, created_date_time, last_modified_date_time)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The insert's parameters and then `reset` (a fresh DeliveryState); owner, app, creation time and
# seen position are not changed.
_SUBSCRIPTION_UPDATE_SQL = (
    "UPDATE subscriptions SET (platform, display_name, push_channel, channel_key,"
    " expiration_date_time, last_modified_date_time) = (?4, ?5, ?6, ?7, ?8, ?10),"
    " last_delivered = CASE WHEN ?11 THEN NULL ELSE last_delivered END,"
    " consecutive_failures = CASE WHEN ?11 THEN 0 ELSE consecutive_failures END,"
    " last_error = CASE WHEN ?11 THEN NULL ELSE last_error END,"
    " gone = CASE WHEN ?11 THEN NULL ELSE gone END"
    " WHERE id = ?1"
)
_PUSH_TARGETS_SQL = (
    f"SELECT {', '.join('s.' + col.strip() for col in SUBSCRIPTION_COLUMNS.split(','))}"
    " FROM json_each(?1) AS k JOIN subscriptions s"
    " ON s.user_id = json_extract(k.value, '$[0]') AND s.app = json_extract(k.value, '$[1]')"
    " WHERE s.push_channel IS NOT NULL AND s.expiration_date_time > ?2 AND s.gone IS NULL"
    " ORDER BY s.user_id, s.app, s.created_date_time, s.id"
)


# -- delivery jobs -----------------------------------------------------------------------------

# The outbox entries still there of these seqs: (user_id, position) and the notification whose
# queued deliveries the change supersedes. NULL if there can be none: the change was pruned, or it
# created the notification (a new id: nothing was queued for it before). Read in the write
# transaction that then deletes them (no other writer can come between).
_OUTBOX_FIND_SQL = (
    "SELECT o.user_id, o.position, c.notification_id FROM json_each(?) AS k"
    " JOIN outbox o ON o.seq = k.value LEFT JOIN changes c ON c.user_id = o.user_id"
    f" AND c.position = o.position AND c.kind <> '{ChangeKind.CREATED.value}'"
)
_OUTBOX_REMOVE_SQL = "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))"
# For one superseding entry (user_id, position, notification_id): the queued deliveries of the
# notification with an older position, found through the user's subscriptions (see
# deliveries_subscription in 0003_push.sql).
_SUPERSEDE_SQL = (
    "DELETE FROM deliveries WHERE subscription_id IN"
    " (SELECT id FROM subscriptions WHERE user_id = ?1) AND notification_id = ?3"
    " AND position < ?2 AND user_id = ?1"
)
_DELIVERY_INSERT_SQL = (
    "INSERT INTO deliveries (subscription_id, user_id, app, provider, message, notification_id,"
    " position, expires, due, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Due deliveries in claim order, with what decides whether they can still be sent. No LIMIT: the
# caller reads until it has enough sendable ones (purging the others on the way).
_CLAIM_SQL = (
    "SELECT d.id, d.subscription_id, d.user_id, d.app, d.message, d.expires, d.attempts,"
    " d.created, s.push_channel, s.seen_position, s.expiration_date_time, s.gone"
    " FROM deliveries d LEFT JOIN subscriptions s ON s.id = d.subscription_id"
    " WHERE d.provider = ? AND d.due <= ? ORDER BY d.due, d.id"
)


def _claim(c: Connection, provider: Provider, at: int, until: int, limit: int) -> list[Delivery]:
    claimed: list[Delivery] = []
    purge: list[tuple[int]] = []
    cursor = c.execute(_CLAIM_SQL, (provider, at))
    try:
        while len(claimed) < limit and len(purge) < PURGE_MAX:
            row = cursor.fetchone()
            if row is None:
                break
            id, sub, user_id, app, message, expires, attempts, created = row[:8]
            push_channel, seen_position, sub_expires, gone = row[8:]
            channel = None if push_channel is None else decode_channel(push_channel)
            if (
                sub_expires is None  # the subscription was deleted
                or sub_expires <= at
                or gone is not None
                or provider_of(channel) != provider
                or expires <= at
            ):
                purge.append((id,))
                continue
            assert channel is not None
            claimed.append(
                Delivery(
                    id=id,
                    subscription_id=sub,
                    user_id=user_id,
                    app=app,
                    provider=provider,
                    channel=channel,
                    message=decode_message(message),
                    attempts=attempts + 1,
                    seen_position=seen_position,
                    created=from_micros(created),
                )
            )
    finally:
        cursor.close()
    # Written once the read is done: changing rows under an open cursor is undefined in SQLite.
    c.executemany("DELETE FROM deliveries WHERE id = ?", purge)
    c.executemany(
        "UPDATE deliveries SET due = ?, attempts = attempts + 1 WHERE id = ?",
        [(until, d.id) for d in claimed],
    )
    return claimed


def _settle(c: Connection, outcomes: Sequence[Settlement], at: int) -> None:
    ids = json.dumps(settle_ids(outcomes))
    found = {
        r[0]: Claimed._make(r[1:])
        for r in c.execute(
            "SELECT d.id, d.subscription_id, d.attempts, s.channel_key FROM json_each(?) AS k"
            " JOIN deliveries d ON d.id = k.value LEFT JOIN subscriptions s"
            " ON s.id = d.subscription_id",
            (ids,),
        )
    }
    plan = settle_plan(outcomes, found)
    c.executemany(
        "UPDATE deliveries SET due = ? WHERE id = ?",
        [(to_micros(due), id) for id, due in plan.retry.items()],
    )
    c.executemany("DELETE FROM deliveries WHERE id = ?", [(id,) for id in plan.delete])
    _delete_deliveries_of(c, [(sub,) for sub in plan.gone])
    c.executemany(
        "UPDATE subscriptions SET"
        " consecutive_failures = CASE WHEN ?2 THEN 0 ELSE consecutive_failures END + ?3,"
        " last_error = CASE WHEN ?3 > 0 THEN ?4 WHEN ?2 THEN NULL ELSE last_error END,"
        " last_delivered = CASE WHEN ?2 THEN ?6 ELSE last_delivered END,"
        " gone = CASE WHEN ?5 THEN ?6 ELSE gone END"
        " WHERE id = ?1",
        [(s.id, s.delivered, s.failures, s.error, s.gone, at) for s in plan.subscriptions],
    )


# -- row mapping -------------------------------------------------------------------------------

_INSERT_SQL = (
    f"INSERT INTO notifications ({NOTIFICATION_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Same parameter order as _INSERT_SQL: (id, ...) -> "SET every column = ? WHERE id = ?".
_UPDATE_SQL = (
    "UPDATE notifications SET ("
    + NOTIFICATION_COLUMNS
    + ") = (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE id = ?1"
)
# A change row and the notification as it is now (NULL columns once deleted or expired).
_CHANGE_FIELDS = ", ".join(
    [f"c.{col}" for col in CHANGE_COLUMNS]
    + [f"n.{col.strip()}" for col in NOTIFICATION_COLUMNS.split(",")]
)
_NOW_JOIN = (
    " LEFT JOIN notifications n ON n.id = c.notification_id"
    f" AND n.user_id = c.user_id AND c.kind IN {LIVE_KINDS}"
    " AND n.expiration_date_time > ?"
)
_CHANGES_SQL = (
    f"SELECT {_CHANGE_FIELDS} FROM changes c{_NOW_JOIN}"
    " WHERE c.user_id = ? AND c.position > ?{app_clause} ORDER BY c.position LIMIT ?"
)
# Inner join: an entry whose change was pruned is skipped (sweep removes it).
_PENDING_SQL = (
    f"SELECT o.seq, o.user_id, {_CHANGE_FIELDS} FROM outbox o"
    f" JOIN changes c ON c.user_id = o.user_id AND c.position = o.position{_NOW_JOIN}"
    " ORDER BY o.seq LIMIT ?"
)


def _row(n: Notification) -> tuple[object, ...]:
    return (
        n.id,
        n.user_id,
        n.app,
        n.app_notification_id,
        n.target_host_name,
        n.group_name,
        # StrEnum members are str: sqlite3 binds them as their text without `.value`.
        n.priority,
        n.read_state,
        n.user_action_state,
        to_micros(n.created_date_time),
        to_micros(n.last_modified_date_time),
        to_micros(n.expiration_date_time),
        n.version,
        encode_content(n),
    )


def _live(c: Connection, user_id: str, app: str, id: str, at: int) -> Notification | None:
    row = c.execute(
        f"SELECT {NOTIFICATION_COLUMNS} FROM notifications"
        " WHERE id = ? AND user_id = ? AND app = ? AND expiration_date_time > ?",
        (id, user_id, app, at),
    ).fetchone()
    return None if row is None else notification_from_row(row, from_micros)
