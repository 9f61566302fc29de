"""Reader threads for the SQLite store's queries that can run long: notification lists and
counts (a `$count` with `$orderby` and a deep `$skip` over 100,000 notifications takes about a
second of SQLite's time).

Each thread has its own connection (WAL lets readers run beside the writer and each other), and
Python's sqlite3 releases the GIL while SQLite steps a statement, so the event loop goes on
serving everyone else meanwhile. Two bounds keep one tenant from taking the readers over: a
user has at most half of them at a time (their further queries wait their turn), and a query
still running `timeout` seconds after it started is interrupted (`sqlite3_interrupt`, which is
safe from another thread and costs nothing while the query runs, unlike a progress handler that
would take the GIL every N steps) and answered with a 400 that says how to narrow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from herald.errors import InvalidRequest
from herald.metrics import SqliteMetrics

log = logging.getLogger("herald.store")

T = TypeVar("T")
C = TypeVar("C", bound=sqlite3.Connection)
INTERRUPT_AGAIN = 0.01  # an interrupt between two statements of a query misses: repeat it


class _Running:
    """One query on a reader: the loop interrupts it through this, under its lock, so that an
    interrupt can never reach the next query on the same connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        self.finished = False
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    def interrupt(self) -> bool:
        """Interrupt the query; False if it has finished."""
        with self.lock:
            if self.finished:
                return False
            self.expired = True
            if self.conn is not None:
                self.conn.interrupt()
            return True


class Readers(Generic[C]):
    def __init__(
        self,
        connect: Callable[[], C],
        size: int,
        timeout: float,
        metrics: SqliteMetrics,
    ) -> None:
        self.timeout = timeout
        self.per_user = max(1, size // 2)
        self._size = size
        self._connect = connect
        self._metrics = metrics
        self._connections: list[C] = []
        self._idle: queue.SimpleQueue[C] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="herald-sqlite-read")
        # Per user: the semaphore, and how many queries hold or await it.
        self._users: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def open(self) -> None:
        for _ in range(self._size):
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._connections.append(conn)
            self._idle.put(conn)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown)
        for conn in self._connections:
            conn.close()
        self._connections.clear()

    async def run(self, user: str, job: Callable[[C], T]) -> T:
        """Run `job` in one read transaction on a reader. sqlite3 errors are left to the caller
        to translate; a query stopped by the timeout raises InvalidRequest."""
        loop = asyncio.get_running_loop()
        async with self._turn(user):
            running = _Running()
            future = self._executor.submit(self._execute, loop, running, job)
            try:
                return await asyncio.wrap_future(future)
            except sqlite3.OperationalError as e:
                if running.expired and e.sqlite_errorcode == sqlite3.SQLITE_INTERRUPT:
                    raise self._stopped(user) from e
                raise
            except asyncio.CancelledError:
                running.interrupt()  # the client left: stop its query
                raise
            finally:
                with running.lock:
                    running.finished = True
                if running.timer is not None:
                    running.timer.cancel()

    @contextlib.asynccontextmanager
    async def _turn(self, user: str) -> AsyncIterator[None]:
        entry = self._users.get(user)
        if entry is None:
            entry = self._users[user] = (asyncio.Semaphore(self.per_user), [0])
        semaphore, count = entry
        count[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            count[0] -= 1
            if not count[0]:  # nobody holds or awaits it
                del self._users[user]

    def _execute(
        self,
        loop: asyncio.AbstractEventLoop,
        running: _Running,
        job: Callable[[C], T],
    ) -> T:
        """On a reader thread."""
        conn = self._idle.get()
        self._metrics.readers_busy.inc()
        try:
            with running.lock:
                if running.finished:  # the caller was cancelled while this waited
                    raise sqlite3.OperationalError("cancelled")
                running.conn = conn
            # The timeout counts from here, not from the queue.
            loop.call_soon_threadsafe(self._arm, loop, running)
            conn.execute("BEGIN")  # one snapshot for the list and its count
            try:
                return job(conn)
            finally:
                with contextlib.suppress(sqlite3.Error):  # read-only: nothing to undo
                    conn.execute("ROLLBACK")
        finally:
            with running.lock:
                running.conn = None
                running.finished = True
            self._metrics.readers_busy.dec()
            self._idle.put(conn)

    def _arm(self, loop: asyncio.AbstractEventLoop, running: _Running) -> None:
        if not running.finished:
            running.timer = loop.call_later(self.timeout, self._expire, loop, running)

    def _expire(self, loop: asyncio.AbstractEventLoop, running: _Running) -> None:
        if running.interrupt():
            running.timer = loop.call_later(INTERRUPT_AGAIN, self._expire, loop, running)

    def _stopped(self, user: str) -> InvalidRequest:
        self._metrics.queries_stopped.inc()
        log.warning("SQLite query stopped after %g s", self.timeout, extra={"user": user})
        return InvalidRequest(
            f"The query ran longer than {self.timeout:g} s and was stopped. Narrow it with"
            " $filter, or ask for an earlier page (a smaller $skip), and leave out $count if"
            " you do not need it."
        )
