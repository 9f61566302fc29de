"""The SQLite store's writer: group commit on the event loop (see `SqliteWriter`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from herald.errors import HeraldError, Unavailable
from herald.metrics import SqliteMetrics
from herald.model import Pending
from herald.store.hooks import CommitHooks
from herald.store.sqlite.checkpointer import Checkpointer, HoldRequest
from herald.store.sqlite.connection import (
    BATCH_FAILURES,
    LOCKED,
    Connection,
    failure_reason,
    raise_if_batch_failure,
    result_code,
    translated,
)
from herald.store.sqlite.puts import PutJob, put_many

log = logging.getLogger("herald.store")

T = TypeVar("T")
Job = Callable[[Connection], Any]

MAX_HOPS = 4  # loop turns a flush may wait for its batch to stop growing
LAZY_SECONDS = 0.002  # a lazy write waits this long at most for another write to join
RETRY_FIRST = 0.001  # a batch that found the write lock taken tries again after this, doubling
RETRY_MAX = 0.05  # up to this (also how often held batches check their deadline)
RETRY_AFTER_FAILED = 5  # Retry-After (s) while the disk is full or failing
# Why batches wait or fail, as the metrics and /readyz name it.
REASONS = {
    "checkpoint": "a checkpoint is restarting the WAL",
    "wal_limit": "the WAL is at sqlite_wal_limit and cannot be checkpointed yet",
    "locked": "another process holds the database's write lock",
    "full": "the disk is full",
    "io": "the database cannot be written",
}


@dataclass(slots=True)
class _Call:
    job: Job
    future: asyncio.Future[Any]
    deadline: float  # loop time by which its transaction must have begun, else 503


class SqliteWriter:
    """Writes run on the event loop's own thread, on one connection (`SqliteDatabase` opens it).

    Why not a writer thread: the server is one process, so a thread adds no parallelism, only GIL
    hand-offs (each costs up to the 5 ms switch interval under load) and cross-thread futures.
    SQLite statements take microseconds and a WAL commit with synchronous=NORMAL does not fsync,
    so running them inline is both faster and simpler. Group commit: writes that arrive while the
    loop is busy are queued and committed together by one `_flush` scheduled with call_soon.
    Checkpoints (the only fsyncs) run on a background thread with its own connection, so they
    never stall the loop.

    Nothing waits on the loop: its connection has no busy timeout. A batch that finds the write
    lock taken (another process: the CLI, a backup) stays queued and is tried again on asyncio
    timers for up to `sqlite_lock_timeout` seconds, then answered 503 with Retry-After; reads,
    health checks and live streams are served meanwhile. The checkpointer holds batches the same
    way while it restarts the WAL, and they stay held while the WAL is at its limit
    (`checkpointer.py` says why).

    A batch that fails for a reason of the database's, not of one call (a full disk, an I/O
    error), is rolled back whole and each call answered 503 with Retry-After. From then until a
    write succeeds, `ping` (so /readyz) fails.
    """

    def __init__(self, database: str, uri: bool, lock_timeout: float) -> None:
        self._database = database
        self._uri = uri
        self._lock_timeout = lock_timeout
        self.metrics = SqliteMetrics()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None  # the next try of a waiting batch
        self._lazy: asyncio.TimerHandle | None = None  # the flush of lazy writes alone
        self._retry = RETRY_FIRST
        self._hops = 0
        self._seen = 0
        self._holds = 0  # checkpoints under way with writes held (see LoopGate)
        self._wal_full = False  # the WAL reached its limit: writes wait for a restart
        self._checkpoint_failure: sqlite3.Error | None = None  # why it could not be restarted
        self._waiting: tuple[str, float] | None = None  # (reason, since) while batches wait
        self._failure: tuple[str, str, float] | None = None  # (reason, message, since)
        self._checkpointer: Checkpointer | None = None
        self._hooks = CommitHooks()

    def on_commit(self, callback: Callable[[], None]) -> None:
        """`Outbox.on_commit`: `_flush` fires the callbacks after a commit that added outbox
        entries."""
        self._hooks.add(callback)

    def on_outboxed(self, take: Callable[[list[Pending], bool], Awaitable[None]]) -> None:
        """`Outbox.on_outboxed`: hands over nothing. The dispatcher's read of the outbox is a
        query in this process, not a round trip to a server: there is no latency to save, and
        measured fan-out on SQLite meets its targets without it (docs/performance.md)."""

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
    async def _write(self, job: Callable[[Connection], T], lazy: bool = False) -> T:
        """Run `job` in the next commit. `lazy`: nobody is waiting on it soon (the dispatcher's
        outbox removals), so it joins the next other write's commit, or has one of its own after
        LAZY_SECONDS: at a steady trickle of posts that halves the commits (each appends the
        WAL frames and pays the commit's fixed cost)."""
        if self._conn is None:
            raise Unavailable("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append(_Call(job, future, loop.time() + self._lock_timeout))
        if not lazy:
            self._schedule(loop)
        elif not self._flush_scheduled and self._lazy is None:
            self._lazy = loop.call_later(LAZY_SECONDS, self._schedule, loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush what is pending soon (`_gather`), unless a flush is on its way."""
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        if not self._flush_scheduled and self._pending:
            self._flush_scheduled = True
            self._hops = 0
            self._seen = 0
            loop.call_soon(self._gather, loop)

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
    def _settle(calls: list[_Call], error: HeraldError) -> None:
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

    # The checkpointer's requests (see LoopGate), on the loop: between two flushes, so no write
    # transaction is open when a hold is granted.
    def hold_writes(self, request: HoldRequest) -> None:
        with request.lock:
            if not request.abandoned:
                self._holds += 1
                request.granted.set()

    def release_writes(self, reset: bool, failure: sqlite3.Error | None) -> None:
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
            self.metrics.commits.inc()
            self.metrics.writes.inc(len(batch))
        return outcomes

    @staticmethod
    def _run_batch(
        conn: Connection, batch: list[_Call], savepoints: bool
    ) -> list[tuple[bool, Any]] | None:
        outcomes: list[tuple[bool, Any]] = []
        i = 0
        while i < len(batch):
            if savepoints:
                outcomes.append(_in_savepoint(conn, batch[i].job))
                i += 1
                continue
            # A run of puts (the common case under load) is written set-wise: a handful of
            # statements for the whole run instead of four per notification.
            j = i
            while j < len(batch) and isinstance(batch[j].job, PutJob):
                j += 1
            if j - i > 1:
                puts = [call.job for call in batch[i:j]]
                try:
                    with translated():
                        outcomes += [(True, r) for r in put_many(conn, puts)]  # type: ignore[arg-type]
                except Exception as e:
                    raise_if_batch_failure(conn, e)
                    return None  # replay the batch one call at a time, with savepoints
                i = j
                continue
            before = conn.total_changes
            try:
                with translated():
                    outcomes.append((True, batch[i].job(conn)))
            except Exception as e:
                raise_if_batch_failure(conn, e)
                if conn.total_changes != before:
                    return None  # partial writes: replay the batch with savepoints
                outcomes.append((False, e))
            i += 1
        return outcomes


def _in_savepoint(conn: Connection, job: Job) -> tuple[bool, Any]:
    conn.execute("SAVEPOINT call")
    outboxed = conn.outboxed
    try:
        with translated():
            result = job(conn)
    except Exception as e:
        raise_if_batch_failure(conn, e)
        conn.execute("ROLLBACK TO call")
        conn.execute("RELEASE call")
        conn.outboxed = outboxed
        return False, e
    conn.execute("RELEASE call")
    return True, result
