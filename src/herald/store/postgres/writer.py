"""The PostgreSQL store's writer and lifecycle: an asyncpg pool, a few batching writer tasks
(see `PostgresWriter`). Each concern's calls (directory.py, notifications.py...) are written as
puts (puts.py) or as ops in a batch transaction (transaction.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import asyncpg

from herald.errors import HeraldError, Unavailable
from herald.model import Pending
from herald.store.hooks import CommitHooks
from herald.store.postgres.connection import (
    DRIVER,
    attached,
    describe,
    refused,
    translate,
    translated,
    unsent,
    usable,
)
from herald.store.postgres.epoch import Epoch, Found, check
from herald.store.postgres.puts import put_again, put_batch
from herald.store.postgres.schema import migrate
from herald.store.postgres.transaction import (
    Appended,
    Committed,
    Op,
    Outcomes,
    Tx,
    probe,
    run_ops,
)
from herald.store.revisions import Put

MAX_BATCH = 4096
# Batches in flight at once, each on its own pooled connection. One is enough to be correct; with
# two, one batch is prepared and answered in Python while the other is in the database (where
# batches share users, the head locks order the second after the first). Measured on 2 cores.
WRITERS = 2
# A writer finding this many calls waiting and another writer idle takes half, so that both work.
SPLIT_AT = 32
# Bounds on waiting for the database (seconds), so that a request during an outage gets a 503 in
# bounded time: a server that refuses connections (down, restarting) answers at once, one that is
# unreachable does not answer at all. A new connection must be up within the connect timeout
# (`postgres_connect_timeout`); a statement must be answered within the statement timeout
# (`postgres_statement_timeout`; then the connection is given up); taking a connection from the
# pool, waiting for a free one included, within their sum. Defaults when no settings are given:
CONNECT_TIMEOUT = 5.0
STATEMENT_TIMEOUT = 15.0
# What runs on the connections kept off the pool (`PostgresWriter._kept`).
OUTBOX, TARGETS, BACKLOG, REMOVALS, LEASES = 0, 1, 2, 3, 4
# `ping` (readiness): how long a probe through the writers may take before it counts as failed.
PING_TIMEOUT = 5.0
# Attempts at a batch that fails before any of it is sent, because its connection had closed.
UNSENT_ATTEMPTS = 3

log = logging.getLogger("herald.store")

T = TypeVar("T")


@dataclass(slots=True)
class _Call:
    work: Put | Op
    future: asyncio.Future[Any]


class _Link:
    """A writer's pooled connection, kept across batches: no acquire and reset per batch."""

    def __init__(self, store: PostgresWriter) -> None:
        self._store = store
        self._conn: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection:
        if self._conn is not None and not usable(self._conn):
            self.drop()  # closed while idle (terminated, server restarted): reconnect
        if self._conn is None:
            self._conn = await self._store._acquire()
        return self._conn

    def drop(self) -> None:
        """Give the connection up (lost, or in a state not worth finding out): the pool opens a
        new one for the next batch."""
        conn, self._conn = self._conn, None
        if conn is not None and attached(conn):
            conn.terminate()  # also returns it to the pool, if it closed without asyncpg noticing

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        pool = self._store._pool
        if conn is not None and pool is not None and attached(conn):
            with contextlib.suppress(Exception):
                await pool.release(conn, timeout=self._store._connect_timeout)


class _Lost(Exception):
    """A batch could not be run to its end on a connection. `sent`: something of it may have
    reached the database (so its outcome is unknown); otherwise none of it was applied."""

    def __init__(self, error: Exception, sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.sent = sent


class PostgresWriter:
    """Writes are batched: calls queue up, and each writer task takes what is waiting as one
    batch, on a pooled connection it keeps. Puts of a batch are one `herald_put_batch`
    statement (puts.py); other writes run as ops in one transaction driven from here
    (transaction.py). A batch the server refuses for one call's sake is retried call by call;
    one whose connection is lost is answered 503 "in doubt", never as done."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        server_settings: dict[str, str] | None = None,
        writers: int = WRITERS,
        connect_timeout: float = CONNECT_TIMEOUT,
        statement_timeout: float = STATEMENT_TIMEOUT,
    ) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._min_size = min_size
        self._max_size = max_size
        self._server_settings = server_settings
        self._pool: asyncpg.Pool | None = None
        self._pending: list[_Call] = []
        self._wake = asyncio.Event()
        # Leave the pool at least one connection for reads.
        self._writer_count = max(1, min(writers, max_size - 1))
        self._writers: list[asyncio.Task[None]] = []
        self._ops_lock = asyncio.Lock()
        self._ops_waiting: list[_Call] = []  # ops left by writers to the one running ops
        self._idle = 0  # writers waiting for work
        self._closing = False
        self._hooks = CommitHooks()
        self._take: Callable[[list[Pending], bool], Awaitable[None]] | None = None
        # Calls kept off the pool and the writers (`_kept`): the dispatcher's outbox reads
        # (`OUTBOX`), its push-target reads (`TARGETS`, looked up while the next batch is read)
        # and its removals (`REMOVALS`, one statement each, in the order they come), and the
        # sends' count of the outbox (`BACKLOG`, polled while a send runs: never in the way of
        # the dispatcher's read), and the shard leases (`LEASES`: a renewal that waited for a
        # pooled connection behind a surge of reads would let them lapse); each kind one at a
        # time on a connection of its own, or through the pool if that would leave it none for
        # other reads.
        self._readers = [_Link(self) for _ in range(5)]
        self._reader_locks = [asyncio.Lock() for _ in self._readers]
        self._keep_readers = max_size >= self._writer_count + len(self._readers) + 1
        # Since when (monotonic) write batches fail for a database reason (logged on change),
        # and the last one the server refused, as (time, reason): None once a batch succeeds.
        self._failing_since: float | None = None
        self._refusal: tuple[float, str] | None = None
        # The database's epoch as this process last found it (None until migrated: before, the
        # table may not exist), and whether skipped ranges exist (epoch.py).
        self._epoch: Epoch | None = None
        self._voided = False
        self._history_hooks = CommitHooks("on_history")

    def _idle_limit(self) -> str:
        """A transaction left open longer than a statement may take is ended by the server.
        Only a process that stopped mid-transaction (frozen, paused, cut off) leaves one open,
        and its row locks would otherwise hold up every other node's writes to those rows (a
        node SIGSTOPped inside `dispatched` kept the other's push settlements waiting on its
        subscriptions' rows until it resumed). Its batch is then answered in doubt, as for any
        connection lost mid-batch. A SET, not a startup parameter (PgBouncer refuses unknown
        ones), so it is made again after the pool's `RESET ALL` on every release."""
        return f"SET idle_in_transaction_session_timeout = {int(self._statement_timeout * 1000)};"

    async def _init(self, conn: asyncpg.Connection) -> None:
        await conn.execute(self._idle_limit())
        if self._epoch is not None:
            # Before its first use: a connection to a database that lost history must not write
            # (or read positions) before the heads have moved past what was lost.
            self._found(await check(conn))

    def _found(self, found: Found) -> None:
        """Note the epoch a connection found. A new one, or heads moved, means this process
        crossed into another history (a failover while it ran): what it sent may be gone."""
        crossed = found.moved or (self._epoch is not None and found.live != self._epoch)
        self._epoch = found.live
        self._voided = self._voided or found.voided
        if crossed:
            log.warning("the database is on a new history (a failover or a restore)")
            self._history_hooks.fire()

    def on_history(self, callback: Callable[[], None]) -> None:
        """`ChangeLog.on_history`: called when a connection of this process finds the database
        on another history than the one before."""
        self._history_hooks.add(callback)

    async def _reset(self, conn: asyncpg.Connection) -> None:
        # asyncpg's own reset query and the limit in one round trip, as the reset alone was.
        await conn.execute(conn.get_reset_query() + "\n" + self._idle_limit())

    def on_commit(self, callback: Callable[[], None]) -> None:
        """`Outbox.on_commit`: `_commit` fires the callbacks after a batch that appended changes
        (so outbox entries), `sweep` after one that expired notifications."""
        self._hooks.add(callback)

    def on_outboxed(self, take: Callable[[list[Pending], bool], Awaitable[None]]) -> None:
        """`Outbox.on_outboxed`: `_commit` awaits `take` after a batch of puts, between answering
        its calls and firing the `on_commit` callbacks. One taker: the dispatcher."""
        self._take = take

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        async with translated():
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=self._server_settings,
                timeout=self._connect_timeout,
                command_timeout=self._statement_timeout,
                init=self._init,
                reset=self._reset,
            )
            try:
                async with self._pool.acquire() as conn:
                    await migrate(conn)
                    self._found(await check(conn))
            except BaseException:
                await self._pool.close()
                self._pool = None
                raise
        self._closing = False
        self._wake = asyncio.Event()
        self._ops_lock = asyncio.Lock()
        self._ops_waiting = []
        self._failing_since = self._refusal = None
        self._writers = [
            asyncio.create_task(self._write_loop(), name=f"herald-postgres-writer-{i}")
            for i in range(self._writer_count)
        ]

    async def close(self) -> None:
        if self._pool is None:
            return
        self._closing = True
        self._wake.set()
        writers, self._writers = self._writers, []
        await asyncio.gather(*writers)
        for link, lock in zip(self._readers, self._reader_locks, strict=True):
            async with lock:
                await link.release()
        pool, self._pool = self._pool, None
        try:
            # Graceful (each connection told goodbye), unless the server does not answer.
            await asyncio.wait_for(pool.close(), self._connect_timeout)
        except (TimeoutError, *DRIVER):
            pool.terminate()

    def _acquire(self) -> Any:
        if self._pool is None:
            raise Unavailable("store is closed")
        return self._pool.acquire(timeout=self._statement_timeout + self._connect_timeout)

    async def ping(self) -> None:
        """Ready means writes can succeed now. A probe through the writers (a transaction on a
        writer's connection, refused by a read-only server: the path writes take, so it meets a
        lost connection or a server that refuses connections just as they would) and a read on
        a pooled connection must both answer within PING_TIMEOUT. Refusals the probe would not
        meet (disk full, out of memory) count for PING_TIMEOUT after the last one."""
        refusal = self._refusal
        if refusal is not None and time.monotonic() - refusal[0] < PING_TIMEOUT:
            raise Unavailable(f"writes are failing: {refusal[1]}", retry_after=1)
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await asyncio.gather(self._submit(Op(None, probe)), self._read_probe())
        except TimeoutError as e:
            message = f"the database did not answer within {PING_TIMEOUT:g} s"
            raise Unavailable(message, retry_after=1) from e

    async def _kept(self, which: int, run: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """A call on a connection kept across calls (`which`: OUTBOX, TARGETS, BACKLOG,
        REMOVALS or LEASES), mostly the dispatcher's, whose outbox read lies on the path of
        every live delivery: a pooled call waits, before answering, for the pool's reset on
        release (a round trip of five statements, as much work for PostgreSQL as the read), and
        a renewal must not wait for a pooled connection at all. Calls of one
        kind run one at a time in the order they come (an asyncio.Lock is first come, first
        served), through the pool too: the removals must reach the store in batch order."""
        async with self._reader_locks[which], translated():
            if not self._keep_readers:
                async with self._acquire() as conn:
                    return await run(conn)
            link = self._readers[which]
            try:
                return await run(await link.connection())
            except BaseException:
                link.drop()  # lost, timed out or cancelled mid-statement: start afresh
                raise

    async def _read_probe(self) -> None:
        async with translated(), self._acquire() as conn:
            await conn.fetchval("SELECT 1")

    def _write_failed(self, e: BaseException, refused: bool = False) -> None:
        reason = describe(e)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("database writes failing", extra={"error": reason})
        if refused:
            self._refusal = (time.monotonic(), reason)

    def _write_succeeded(self) -> None:
        if self._failing_since is not None:
            seconds = round(time.monotonic() - self._failing_since, 3)
            log.warning("database writes recovered", extra={"seconds": seconds})
        self._failing_since = self._refusal = None

    # -- the writer ----------------------------------------------------------------------------
    async def _submit(self, work: Put | Op) -> Any:
        if self._pool is None or self._closing:
            raise Unavailable("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Call(work, future))
        self._wake.set()
        return await future

    def _op(self, user_id: str | None, run: Callable[[Tx], Awaitable[T]]) -> Awaitable[T]:
        """Submit an op: `run` in the next batch transaction, with the head of `user_id` locked
        if given (see `Op`); answers what `run` returns."""
        return cast(Awaitable[T], self._submit(Op(user_id, run)))

    async def _write_loop(self) -> None:
        link = _Link(self)
        try:
            while True:
                while not self._pending:
                    if self._closing:
                        return
                    self._wake.clear()
                    self._idle += 1
                    try:
                        await self._wake.wait()
                    finally:
                        self._idle -= 1
                take = MAX_BATCH
                if self._idle and len(self._pending) >= SPLIT_AT:
                    take = min(MAX_BATCH, (len(self._pending) + 1) // 2)
                batch, self._pending = self._pending[:take], self._pending[take:]
                if self._pending:
                    self._wake.set()  # more than one batch waiting: another writer takes the rest
                try:
                    await self._write(link, batch)
                except Exception as e:  # a bug: answer the calls, keep the writer alive
                    log.exception("postgres writer failed")
                    _answer(batch, [(False, HeraldError(f"write failed: {e!r}"))] * len(batch))
        finally:
            await link.release()

    async def _write(self, link: _Link, batch: list[_Call]) -> None:
        puts = [c for c in batch if isinstance(c.work, Put)]
        ops = [c for c in batch if not isinstance(c.work, Put)]
        # Puts of one key go to successive calls: the first ones, then the second ones... They
        # answer their outbox entries for the dispatcher only while nothing else waits (posts
        # that trickle in: a load is read in bulk by the dispatcher anyway).
        entries = self._take is not None and not self._pending
        for k, generation in enumerate(_generations(puts)):
            put = put_batch if k == 0 else put_again
            await self._commit(link, generation, functools.partial(put, entries=entries))
        if not ops:
            return
        # One ops transaction at a time per store: they may take other row locks (apps,
        # idempotency keys) in any order, which could deadlock two of them. A writer does not
        # wait for another's: it leaves its ops to the one running ops, which takes them next,
        # and goes back to the puts. An ops transaction waiting on a row lock (held by another
        # node, say one frozen mid-transaction until PostgreSQL ends it) holds up only the ops,
        # never the posts (CI: a node SIGSTOPped inside a settle held the other's posts 10 s).
        self._ops_waiting.extend(ops)
        if self._ops_lock.locked():
            return
        async with self._ops_lock:
            while self._ops_waiting:  # no await between the last look and the release
                ops, self._ops_waiting = self._ops_waiting, []
                try:
                    await self._commit(link, ops, run_ops)
                except Exception as e:  # a bug: answer them (other writers' too), go on
                    log.exception("postgres writer failed")
                    _answer(ops, [(False, HeraldError(f"write failed: {e!r}"))] * len(ops))

    async def _commit(
        self,
        link: _Link,
        batch: list[_Call],
        run: Callable[[asyncpg.Connection, list[Any]], Awaitable[Committed]],
    ) -> None:
        """Commit the batch in one transaction and answer its calls.

        If the server refuses it for one call's sake, each call is retried in a transaction of
        its own, so only the offending call fails; if for the database's (read-only, disk full,
        timed out), every call is answered 503. If the connection is lost, the batch is not
        retried: a statement or its COMMIT may have been applied just before, so its calls are
        answered 503 (in doubt), never as done; only a batch that never left this process is sent
        again on a new connection (see `_attempt`)."""
        try:
            outcomes, appended = await self._attempt(link, [c.work for c in batch], run)
        except asyncio.CancelledError as e:  # cancelled during close: nobody is left to answer
            _answer(batch, [(False, Unavailable(f"store closed: {e!r}"))] * len(batch))
            raise
        except _Lost as e:
            self._write_failed(e.error)
            error = _in_doubt(e.error) if e.sent else translate(e.error)
            outcomes, appended = [(False, error)] * len(batch), False
        except Exception as e:
            error = translate(e)
            transient = isinstance(error, Unavailable)  # read-only, disk full, timed out...
            if len(batch) > 1 and refused(e) and not transient:
                for call in batch:  # nothing was applied: retry apart, only the culprit fails
                    await self._commit(link, [call], run)
                return
            if transient:
                self._write_failed(e, refused=refused(e))
            elif not isinstance(e, DRIVER):  # a bug: its calls fail, the writer goes on
                log.exception("postgres write batch failed")
            outcomes, appended = [(False, error)] * len(batch), False
        else:
            self._write_succeeded()
        _answer(batch, outcomes)
        if isinstance(appended, Appended) and appended.first and self._take is not None:
            try:
                await self._take(appended.first, appended.whole)
            except Exception:  # the entries stay in the outbox: the dispatcher reads them
                log.exception("on_outboxed callback failed")
        if appended:
            self._hooks.fire()

    async def _attempt(
        self,
        link: _Link,
        works: list[Any],
        run: Callable[[asyncpg.Connection, list[Any]], Awaitable[Committed]],
    ) -> Committed:
        """Run the batch; a lost connection is raised as `_Lost`, a refusal as it came."""
        for attempt in range(1, UNSENT_ATTEMPTS + 1):
            try:
                conn = await link.connection()
            except Exception as e:
                raise _Lost(e, sent=False) from e
            try:
                return await run(conn, works)
            except Exception as e:
                if not isinstance(e, DRIVER) or (refused(e) and usable(conn)):
                    raise
                never_sent = unsent(e, conn)
                link.drop()
                if attempt == UNSENT_ATTEMPTS or not never_sent:
                    raise _Lost(e, sent=not never_sent) from e
            # The pool may hold more connections the server has just closed, whose closing
            # asyncpg has not read yet: let it read, then take the next one.
            await asyncio.sleep(0.01)
        raise AssertionError("unreachable")

    async def _exclusive(self, run: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """A write that must pick its users itself (sweep): its own transaction, outside batches."""
        async with translated(), self._acquire() as conn, conn.transaction():
            return await run(conn)


def _generations(calls: list[_Call]) -> list[list[_Call]]:
    """Split puts so that no key occurs twice in one `herald_put_batch` call: the k-th put of a
    key (user, app, appNotificationId or else the new id) goes to the k-th call. The same for
    Idempotency-Keys (one insert may not meet its own row twice; the later put finds the
    earlier one's record)."""
    seen: dict[tuple[str, ...], int] = {}
    generations: list[list[_Call]] = []
    for call in calls:
        p = call.work
        assert isinstance(p, Put)
        keys = [(p.user_id, p.app, p.content.app_notification_id or p.new_id)]
        if p.once is not None:
            keys.append(("", p.once.scope, p.once.key))  # "": apart from notification keys
        k = max(seen.get(key, 0) for key in keys)
        for key in keys:
            seen[key] = k + 1
        while k >= len(generations):
            generations.append([])
        generations[k].append(call)
    return generations


def _answer(batch: list[_Call], outcomes: Outcomes) -> None:
    for call, (ok, value) in zip(batch, outcomes, strict=True):
        if call.future.done():  # the caller was cancelled
            continue
        if ok:
            call.future.set_result(value)
        else:
            call.future.set_exception(value)


def _in_doubt(e: BaseException) -> Unavailable:
    return Unavailable(
        "The database connection was lost during this write, so it may or may not have been"
        f" applied ({describe(e)}). Retry it; an Idempotency-Key makes the retry safe.",
        retry_after=1,
    )
