"""The SQLite store's checkpointer: copies the WAL back into the database on a thread of its
own, and keeps the WAL file under its bound (`sqlite_wal_limit`).

Why a WAL grows without bound under sustained writes: a checkpoint copies WAL frames into the
database, but the WAL is only started over from its beginning when a write transaction begins at
a moment when every frame has been copied and no reader still uses the WAL. A PASSIVE checkpoint
never waits for such a moment, and writes that never pause leave none: each PASSIVE checkpoint
ends with newer frames already appended behind it, so the file only grows (the same happens
while a long read keeps old frames in use: "checkpoint starvation").

So once the WAL passes half the limit (`soft`), the checkpointer makes that moment. PASSIVE
checkpoints copy most frames while writes go on (repeated until one is quick, so little is left);
then it asks the store to hold new write batches (`Gate.hold`: the store runs every write on its
event loop, so holding them is a flag, and reads go on), runs a RESTART checkpoint (copies the
few frames appended meanwhile and waits briefly for readers to leave the WAL) and lets writes go
on: the next one starts the WAL over from its beginning. `journal_size_limit` (set to `soft` on
the writer's connection) makes that write cut the file back to `soft` bytes, so the file is
longer than `soft` only while its content is. Should the WAL reach the limit anyway (readers kept
it in use, checkpoints fail), the store holds writes until a RESTART succeeds. After
IDLE_SECONDS without a new frame a TRUNCATE checkpoint empties the file.

Why not TRUNCATE under load too: it also cuts the file to zero bytes while writes are held, and
freeing tens of megabytes took 15-40 ms on ext4 (measured). What a RESTART costs with writes held
is mostly the database file's fdatasync: PASSIVE checkpoints that cannot finish (writes go on
behind them) do not sync, so the RESTART would flush every page they copied since the last one
(20-40 ms at about 4,700 posts/s on the reference machine). `_sync_database` flushes them before
writes are held, which leaves 5-7 ms per restart, about once a second at that rate
(docs/storage.md has the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Protocol

from herald.metrics import SqliteMetrics

log = logging.getLogger("herald.store")

PASSIVE_SECONDS = 1.0  # how often the WAL is copied back while writes go on
IDLE_SECONDS = 5.0  # no new WAL frame for this long: truncate the WAL
# Before a RESTART, PASSIVE checkpoints are repeated (up to CATCH_UP_PASSES) until one takes less
# than CAUGHT_UP_SECONDS or stops getting quicker: each copies what was appended during the one
# before.
CATCH_UP_PASSES = 4
CAUGHT_UP_SECONDS = 0.01
# While writes are held, a RESTART waits this long for readers to leave the WAL: long enough for
# point reads (microseconds), not for a long list (up to sqlite_query_timeout), which would stall
# every write meanwhile; one that finds such a reader is tried again after PASSIVE_SECONDS.
READERS_WAIT_MS = 20
# Once the WAL is at its limit writes wait anyway: then a RESTART waits up to FULL_WAIT_MS, and
# is tried again after FULL_RETRY_SECONDS.
FULL_WAIT_MS = 1000
FULL_RETRY_SECONDS = 0.05
FAILED_RETRY_SECONDS = 1.0  # a checkpoint that failed (a full disk) is tried again after
HOLD_ACK_SECONDS = 5.0  # how long the checkpointer waits for the loop to hold writes


class Gate(Protocol):
    """The store's side of a truncate: no write transaction runs while it does."""

    def hold(self) -> bool:
        """Block until no write transaction is open and none will begin before `release`;
        False if writes could not be held (the store is closing)."""

    def release(self, reset: bool, failure: sqlite3.Error | None) -> None:
        """Let writes begin again. `reset`: the checkpoint completed, so the next write starts
        the WAL over; `failure`: the error it met, if any."""


class HoldRequest:
    """The checkpointer's request to hold writes; granted on the loop, or abandoned by the
    checkpointer if the loop did not answer in time (then it must not be granted later)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.granted = threading.Event()
        self.abandoned = False


class LoopGate:
    """How the checkpointer holds the store's writes (its methods run on the checkpointer
    thread; the store's side runs on the loop)."""

    def __init__(self, store: Holder, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop

    def hold(self) -> bool:
        request = HoldRequest()
        try:
            self._loop.call_soon_threadsafe(self._store.hold_writes, request)
        except RuntimeError:  # the loop is closed
            return False
        if request.granted.wait(HOLD_ACK_SECONDS):
            return True
        with request.lock:
            request.abandoned = not request.granted.is_set()
            return not request.abandoned

    def release(self, reset: bool, failure: sqlite3.Error | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
            self._loop.call_soon_threadsafe(self._store.release_writes, reset, failure)


class Holder(Protocol):
    """The store's side of a hold, called on its event loop between two write batches."""

    def hold_writes(self, request: HoldRequest) -> None:
        """Hold writes from now on, and set `request.granted`, unless it was abandoned."""

    def release_writes(self, reset: bool, failure: sqlite3.Error | None) -> None:
        """Let writes begin again (see `Gate.release`)."""


class Checkpointer:
    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        database: str,
        limit: int,
        gate: Gate,
        metrics: SqliteMetrics,
    ) -> None:
        self.wal = f"{database}-wal"
        self._path = os.path.realpath(database)
        self._inode: tuple[int, int] | None = None
        self._fd: int | None = None  # SQLite's descriptor of the database file (_sync_database)
        self.limit = limit  # 0: no bound (PASSIVE checkpoints only, as before the bound)
        self.soft = limit // 2
        self._connect = connect
        self._gate = gate
        self._metrics = metrics
        self._due = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._frames = -1  # WAL frames at the last PASSIVE checkpoint
        self._quiet_since = time.monotonic()  # when they last changed
        self._restarted = -1  # WAL frames when the last RESTART completed
        self._thread = threading.Thread(
            target=self._run, name="herald-sqlite-checkpoint", daemon=True
        )

    def wal_bytes(self) -> int:
        try:
            return os.stat(self.wal).st_size
        except OSError:  # no WAL file (yet, or any more)
            return 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the round under way (blocks: call from a worker thread)."""
        self._stop.set()
        self._due.set()
        self._thread.join()

    def request(self) -> None:
        """Run a round now (the store, after a commit left the WAL past half the limit)."""
        self._due.set()

    def _run(self) -> None:
        conn = self._connect()
        with contextlib.suppress(OSError):
            found = os.stat(self._path)
            self._inode = (found.st_dev, found.st_ino)
        try:
            delay = PASSIVE_SECONDS
            while True:
                self._due.wait(delay)
                if self._stop.is_set():
                    return
                self._due.clear()
                delay = self._round(conn)
        finally:
            conn.close()

    def _round(self, conn: sqlite3.Connection) -> float:
        """One round; returns the seconds until the next one (unless requested sooner)."""
        if self.wal_bytes() == 0:
            return PASSIVE_SECONDS
        _, failure, frames = self._checkpoint(conn, "PASSIVE")
        if not self.limit:
            return PASSIVE_SECONDS
        # Idle: no frame appended for a while (commits that change nothing append none).
        if frames != self._frames:
            self._frames, self._quiet_since = frames, time.monotonic()
        idle = time.monotonic() - self._quiet_since >= IDLE_SECONDS
        size = self.wal_bytes()
        if idle and size > 0:
            _, failure, _ = self._reset(conn, "TRUNCATE", READERS_WAIT_MS)
        elif size > self.soft and frames != self._restarted:
            # (A restart leaves the file as long as it was until the next write: `_restarted`
            # keeps a quiet WAL from being restarted again and again meanwhile.)
            full = size >= self.limit
            if not full and failure is None:
                failure = self._catch_up(conn)
            self._sync_database()
            wait = FULL_WAIT_MS if full else READERS_WAIT_MS
            done, failure, restarted = self._reset(conn, "RESTART", wait)
            if done:
                self._restarted = restarted
            elif failure is None and full:
                return FULL_RETRY_SECONDS
        return FAILED_RETRY_SECONDS if failure is not None else PASSIVE_SECONDS

    def _catch_up(self, conn: sqlite3.Connection) -> sqlite3.Error | None:
        """PASSIVE checkpoints while writes go on, until one is quick (or no quicker than the
        one before: fsyncs take what they take): what the RESTART then copies with writes held
        is only what was appended during that last one."""
        previous = float("inf")
        for _ in range(CATCH_UP_PASSES):
            start = time.perf_counter()
            _, failure, _ = self._checkpoint(conn, "PASSIVE")
            took = time.perf_counter() - start
            if failure is not None or took < CAUGHT_UP_SECONDS or took > previous * 0.8:
                return failure
            previous = took
        return None

    def _sync_database(self) -> None:
        """fdatasync the database file now, writes going on, so that the RESTART's own sync
        (writes held) finds little left to flush: PASSIVE checkpoints that could not finish
        leave every page they copied unsynced, and flushing them took 20-40 ms of the 25-45 ms
        writes were held (measured; 5-7 ms with this).

        Through a descriptor SQLite already has open on the file (found in /proc/self/fd), not
        one of our own: closing a descriptor of the file would drop the POSIX locks SQLite holds
        on it for this process. Where that is not possible (not Linux), the RESTART syncs it all.
        """
        fd = self._fd if self._fd is not None and self._is_database(self._fd) else None
        if fd is None:
            fd = self._fd = self._find_database_fd()
        if fd is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: the RESTART syncs it all
                os.fdatasync(fd)

    def _is_database(self, fd: int) -> bool:
        try:
            found = os.fstat(fd)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == self._inode

    def _find_database_fd(self) -> int | None:
        if not hasattr(os, "fdatasync"):
            return None
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for name in names:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") == self._path and self._is_database(
                    int(name)
                ):
                    return int(name)
        return None

    def _reset(
        self, conn: sqlite3.Connection, mode: str, wait_ms: int
    ) -> tuple[bool, sqlite3.Error | None, int]:
        """A RESTART or TRUNCATE checkpoint with the store's writes held: (completed, the error
        it met, WAL frames)."""
        if not self._gate.hold():
            return False, None, -1
        outcome, failure, frames = "failed", None, -1
        try:
            conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            outcome, failure, frames = self._checkpoint(conn, mode)
        finally:
            self._gate.release(outcome == "done", failure)
        return outcome == "done", failure, frames

    def _checkpoint(
        self, conn: sqlite3.Connection, mode: str
    ) -> tuple[str, sqlite3.Error | None, int]:
        """Run one; (outcome: done, busy or failed; the error if it failed; frames in the WAL)."""
        start = time.perf_counter()
        failure, frames = None, -1
        try:
            busy, frames, _ = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            outcome = "busy" if busy else "done"
        except sqlite3.Error as e:
            failure, outcome = e, "failed"
        name = mode.lower()
        self._metrics.checkpoints.labels(name, outcome).inc()
        self._metrics.checkpoint_seconds.labels(name).observe(time.perf_counter() - start)
        if failure is not None and not self._failing:
            log.warning(
                "SQLite checkpoint failed: %s (WAL %d bytes)",
                failure,
                self.wal_bytes(),
                extra={"error": str(failure)},
            )
            self._failing = True
        elif outcome == "done" and self._failing:
            log.info("SQLite checkpoints succeed again")
            self._failing = False
        return outcome, failure, frames
