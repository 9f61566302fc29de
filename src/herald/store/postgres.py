"""The PostgreSQL store: asyncpg pool, a few batching writer tasks, one statement per put batch.

Every write transaction first locks the `feed_heads` rows of all users it touches, in one statement
and in byte order of user id: that serialises writers per user (several writer tasks, several
Herald nodes) without deadlocks, and positions are then allocated from those rows, so they commit
gap-free and in order.

Puts, the hot path, go to the server-side function `herald_put_batch` (see the migrations): a
whole batch is one statement outside an explicit transaction, i.e. one round trip and its own
transaction. Other writes are rarer and run as a batch transaction driven from here.

Every change gets an outbox row in its transaction. Outbox seqs come from a sequence, drawn after
the head locks: per user, a later transaction draws larger seqs (see 0002_devices.sql).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from herald.errors import Conflict, HeraldError, NotFound, QuotaExceeded, Unavailable
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
from herald.query import Filter, Page, Query
from herald.store.base import Once, Remembered
from herald.store.sql import (
    APP_ORDER,
    APP_SELECT,
    CHANGE_COLUMNS,
    CHANNEL_TAG,
    DELETE_APP,
    LIVE_KINDS,
    NOTIFICATION_COLUMNS,
    POSTGRES,
    SUBSCRIPTION_COLUMNS,
    Claimed,
    CommitHooks,
    app_from_row,
    as_utc,
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
    migrations,
    new_notification,
    notification_from_row,
    order_by,
    patched,
    pending_from_row,
    settle_ids,
    settle_plan,
    stored_subscription,
    subscription_from_row,
)

MAX_BATCH = 4096
# Batches in flight at once, each on its own pooled connection. One is enough to be correct; with
# two, one batch is prepared and answered in Python while the other is in the database (where
# batches share users, the head locks order the second after the first). Measured on 2 cores.
WRITERS = 2
# A writer finding this many calls waiting and another writer idle takes half, so that both work.
SPLIT_AT = 32
# Rounds of a claim that purged undeliverable rows and so returned fewer than asked for: each
# round claims again for the rest (bounded, so a claim's latency is too).
CLAIM_ROUNDS = 8
# Bounds on waiting for the database (seconds), so that a request during an outage gets a 503 in
# bounded time: a server that refuses connections (down, restarting) answers at once, one that is
# unreachable does not answer at all. A new connection must be up within the connect timeout
# (`postgres_connect_timeout`); a statement must be answered within the statement timeout
# (`postgres_statement_timeout`; then the connection is given up); taking a connection from the
# pool, waiting for a free one included, within their sum. Defaults when no settings are given:
CONNECT_TIMEOUT = 5.0
STATEMENT_TIMEOUT = 15.0
# `ping` (readiness): how long a probe through the writers may take before it counts as failed.
PING_TIMEOUT = 5.0
MIGRATION_TIMEOUT = 3600.0
# Rounds of a batch with Idempotency-Keys that other transactions recorded first (each round
# takes those puts out, so two are the most that ever run short of a pathological race).
RECORD_ROUNDS = 4
# Attempts at a batch that fails before any of it is sent, because its connection had closed.
UNSENT_ATTEMPTS = 3

log = logging.getLogger("herald.store")

# The database is away or cannot take writes right now; a retry later may succeed (503).
_TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutdown, terminated, cancelled, starting up
    asyncpg.InsufficientResourcesError,  # class 53: disk full, out of memory, too many clients
    asyncpg.ReadOnlySQLTransactionError,  # connected to a standby (after a failover)
    asyncpg.DeadlockDetectedError,
)
# Everything the driver raises (DataError, a value it cannot encode, is an InterfaceError).
_DRIVER = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def translate(e: BaseException) -> HeraldError:
    """The one place asyncpg exceptions are mapped to `herald.errors`."""
    if isinstance(e, HeraldError):
        return e
    if isinstance(e, asyncpg.UniqueViolationError):
        return Conflict(f"conflicting record: {e}")
    if isinstance(e, _TRANSIENT) and not isinstance(e, asyncpg.DataError):
        return Unavailable(f"database unavailable: {_describe(e)}", retry_after=1)
    return HeraldError(f"database error: {e}")


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Let only `herald.errors` escape (of the driver's errors)."""
    try:
        yield
    except _DRIVER as e:
        raise translate(e) from e


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _attached(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection is still the caller's: when asyncpg sees a connection close,
    it takes it back into the pool itself, and every call on the caller's proxy then raises.
    (Not always: a connection can also be closed and still attached, until released.)"""
    try:
        conn.is_closed()
    except asyncpg.InterfaceError:  # "released back to the pool"
        return False
    return True


def _open(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection can still be used."""
    return _attached(conn) and not conn.is_closed()


def _refused(e: BaseException) -> bool:
    """Whether the server (or the driver, before sending) refused a statement, leaving the
    connection fine and the transaction rolled back: then no call of the batch was applied."""
    if isinstance(e, asyncpg.PostgresError):
        return not isinstance(e, asyncpg.PostgresConnectionError) and (
            not isinstance(e, asyncpg.OperatorInterventionError)
            or isinstance(e, asyncpg.QueryCanceledError)
        )
    return isinstance(e, asyncpg.DataError)


def _unsent(e: BaseException, conn: asyncpg.Connection) -> bool:
    """Whether `e` was raised before the statement left this process, because the connection
    had already closed: then nothing of the batch reached the database, and it may be sent again
    on a new connection. (A connection the server closed while idle is only noticed here when
    its closing is still unread on the socket.)"""
    if isinstance(e, asyncpg.InternalClientError):  # the protocol refused to start the statement
        return str(e).startswith(("cannot switch to state", "not connected"))
    return isinstance(e, asyncpg.InterfaceError) and not _open(conn)


def _identity(value: datetime) -> datetime:
    return value


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{col.strip()}" for col in NOTIFICATION_COLUMNS.split(","))


def _from_row(row: Sequence[Any]) -> Notification:
    return notification_from_row(row, _identity)


# -- the write batch ---------------------------------------------------------------------------


@dataclass
class Tx:
    """One batch transaction: the locked heads and the changes to append at commit."""

    conn: asyncpg.Connection
    heads: dict[str, int]
    changes: list[tuple[str, int, str, str, str, datetime, str | None]] = field(
        default_factory=list
    )

    def append(
        self,
        user_id: str,
        kind: ChangeKind,
        app: str,
        nid: str,
        at: datetime,
        origin: str | None = None,
    ) -> None:
        self.heads[user_id] += 1
        self.changes.append((user_id, self.heads[user_id], kind.value, app, nid, at, origin))


@dataclass(slots=True)
class Put:
    user_id: str
    app: str
    content: Content
    new_id: str
    now: datetime
    origin: str | None = None
    once: Once | None = None


@dataclass(slots=True)
class Op:
    """Any other write: `run` reads and writes through the transaction, checking before writing."""

    user_id: str | None
    run: Callable[[Tx], Awaitable[Any]]


@dataclass(slots=True)
class _Call:
    work: Put | Op
    future: asyncio.Future[Any]


Outcomes = list[tuple[bool, Any]]
# A batch step's answer: one outcome per call, and whether it appended changes (outbox rows).
Committed = tuple[Outcomes, bool]


class _Link:
    """A writer's pooled connection, kept across batches: no acquire and reset per batch."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._conn: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection:
        if self._conn is not None and not _open(self._conn):
            self.drop()  # closed while idle (terminated, server restarted): reconnect
        if self._conn is None:
            self._conn = await self._store._acquire()
        return self._conn

    def drop(self) -> None:
        """Give the connection up (lost, or in a state not worth finding out): the pool opens a
        new one for the next batch."""
        conn, self._conn = self._conn, None
        if conn is not None and _attached(conn):
            conn.terminate()  # also returns it to the pool, if it closed without asyncpg noticing

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        pool = self._store._pool
        if conn is not None and pool is not None and _attached(conn):
            with contextlib.suppress(Exception):
                await pool.release(conn, timeout=self._store._connect_timeout)


class _Lost(Exception):
    """A batch could not be run to its end on a connection. `sent`: something of it may have
    reached the database (so its outcome is unknown); otherwise none of it was applied."""

    def __init__(self, error: Exception, sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.sent = sent


class PostgresStore:
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
        self._idle = 0  # writers waiting for work
        self._closing = False
        self._hooks = CommitHooks()
        # The `seen` calls waiting for the writer (subscription id -> highest position), and the
        # write that will record them.
        self._seen: dict[str, int] | None = None
        self._seen_done: asyncio.Future[None] | None = None
        # Since when (monotonic) write batches fail for a database reason (logged on change),
        # and the last one the server refused, as (time, reason): None once a batch succeeds.
        self._failing_since: float | None = None
        self._refusal: tuple[float, str] | None = None

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
            )
            try:
                async with self._pool.acquire() as conn:
                    await _migrate(conn)
            except BaseException:
                await self._pool.close()
                self._pool = None
                raise
        self._closing = False
        self._wake = asyncio.Event()
        self._ops_lock = asyncio.Lock()
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
        pool, self._pool = self._pool, None
        try:
            # Graceful (each connection told goodbye), unless the server does not answer.
            await asyncio.wait_for(pool.close(), self._connect_timeout)
        except (TimeoutError, *_DRIVER):
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
                await asyncio.gather(self._submit(Op(None, _probe)), self._read_probe())
        except TimeoutError as e:
            message = f"the database did not answer within {PING_TIMEOUT:g} s"
            raise Unavailable(message, retry_after=1) from e

    async def _read_probe(self) -> None:
        async with translated(), self._acquire() as conn:
            await conn.fetchval("SELECT 1")

    def _write_failed(self, e: BaseException, refused: bool = False) -> None:
        reason = _describe(e)
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
        # Puts of one key go to successive calls: the first ones, then the second ones...
        for k, generation in enumerate(_generations(puts)):
            await self._commit(link, generation, _put_batch if k == 0 else _put_again)
        if ops:
            # One ops transaction at a time per store: they may take other row locks
            # (apps, idempotency keys) in any order, which could deadlock two of them.
            async with self._ops_lock:
                await self._commit(link, ops, _transaction)

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
            if len(batch) > 1 and _refused(e) and not transient:
                for call in batch:  # nothing was applied: retry apart, only the culprit fails
                    await self._commit(link, [call], run)
                return
            if transient:
                self._write_failed(e, refused=_refused(e))
            elif not isinstance(e, _DRIVER):  # a bug: its calls fail, the writer goes on
                log.exception("postgres write batch failed")
            outcomes, appended = [(False, error)] * len(batch), False
        else:
            self._write_succeeded()
        _answer(batch, outcomes)
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
                if not isinstance(e, _DRIVER) or (_refused(e) and _open(conn)):
                    raise
                unsent = _unsent(e, conn)
                link.drop()
                if attempt == UNSENT_ATTEMPTS or not unsent:
                    raise _Lost(e, sent=not unsent) from e
            # The pool may hold more connections the server has just closed, whose closing
            # asyncpg has not read yet: let it read, then take the next one.
            await asyncio.sleep(0.01)
        raise AssertionError("unreachable")

    async def _exclusive(self, run: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """A write that must pick its users itself (sweep): its own transaction, outside batches."""
        async with translated(), self._acquire() as conn, conn.transaction():
            return await run(conn)

    # -- apps ----------------------------------------------------------------------------------
    # Ops must fail before they write (an op's error does not roll its transaction back): each
    # checks first, and inserts with ON CONFLICT DO NOTHING.
    async def add_app(self, app: App) -> None:
        async def run(tx: Tx) -> None:
            if await _client_exists(tx.conn, app.client_id):
                raise Conflict("an app with this client id or host name exists")
            added = await tx.conn.fetchval(
                "INSERT INTO apps VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING host_name",
                app.host_name,
                app.display_name,
                app.created_date_time,
            )
            if added is None:
                raise Conflict("an app with this client id or host name exists")
            await _insert_client(tx.conn, app)

        await self._submit(Op(None, run))

    async def add_client(self, app: App) -> None:
        async def run(tx: Tx) -> None:
            if not await tx.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM apps WHERE host_name = $1)", app.host_name
            ):
                raise NotFound(f"no app with host name {app.host_name!r}")
            if await _client_exists(tx.conn, app.client_id):
                raise Conflict(f"the client id {app.client_id!r} is taken")
            await _insert_client(tx.conn, app)

        await self._submit(Op(None, run))

    async def remove_client(self, client_id: str) -> None:
        async def run(tx: Tx) -> None:
            siblings = await tx.conn.fetchval(
                "SELECT (SELECT count(*) FROM app_clients AS o WHERE o.host_name = a.host_name)"
                " FROM app_clients AS a WHERE a.client_id = $1",
                client_id,
            )
            if siblings is None:
                raise NotFound(f"no client id {client_id!r}")
            if siblings < 2:
                raise Conflict(LAST_CLIENT)
            await tx.conn.execute("DELETE FROM app_clients WHERE client_id = $1", client_id)

        await self._submit(Op(None, run))

    async def set_client_secret(self, client_id: str, secret_hash: str) -> None:
        async def run(tx: Tx) -> None:
            done = await tx.conn.fetchval(
                "UPDATE app_clients SET secret_hash = $2 WHERE client_id = $1 RETURNING 1",
                client_id,
                secret_hash,
            )
            if done is None:
                raise NotFound(f"no client id {client_id!r}")

        await self._submit(Op(None, run))

    async def get_app(self, client_id: str) -> App | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(f"{APP_SELECT} WHERE c.client_id = $1", client_id)
        return None if row is None else app_from_row(row, as_utc)

    async def list_apps(self) -> list[App]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(APP_SELECT + APP_ORDER)
        return [app_from_row(r, as_utc) for r in rows]

    async def delete_app(self, host_name: str) -> dict[str, int] | None:
        async def run(tx: Tx) -> dict[str, int] | None:
            if not await tx.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM apps WHERE host_name = $1)", host_name
            ):
                return None
            # Positions come from feed_heads here, so removing changes never reuses one.
            counts = {}
            for kind, statement in DELETE_APP:
                status = await tx.conn.execute(statement.format(p="$1"), host_name)
                counts[kind] = int(status.split()[-1])
            del counts["apps"]
            return counts

        result: dict[str, int] | None = await self._submit(Op(None, run))
        return result

    # -- user principal names ------------------------------------------------------------------
    async def user_of(self, upn: str) -> str | None:
        async with translated(), self._acquire() as conn:
            found = await conn.fetchval("SELECT user_id FROM user_names WHERE upn = $1", upn)
        return None if found is None else str(found)

    async def name_user(self, upn: str, user_id: str, pinned: bool, now: datetime) -> bool:
        async def run(tx: Tx) -> bool:
            await tx.conn.execute(
                "INSERT INTO user_names VALUES ($1, $2, $3, $4) ON CONFLICT (upn) DO UPDATE"
                " SET user_id = $2, pinned = $3, updated = $4"
                " WHERE $3 OR user_names.user_id = $2",
                upn,
                user_id,
                pinned,
                now,
            )
            named = await tx.conn.fetchval("SELECT user_id FROM user_names WHERE upn = $1", upn)
            return bool(named == user_id)

        result: bool = await self._submit(Op(None, run))
        return result

    async def forget_user_name(self, upn: str) -> bool:
        async def run(tx: Tx) -> bool:
            status = await tx.conn.execute("DELETE FROM user_names WHERE upn = $1", upn)
            return bool(status != "DELETE 0")

        result: bool = await self._submit(Op(None, run))
        return result

    async def list_user_names(self) -> list[tuple[str, str, bool]]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch("SELECT upn, user_id, pinned FROM user_names ORDER BY upn")
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
        result: tuple[Notification, bool] = await self._submit(
            Put(user_id, app, content, new_id, now, origin)
        )
        return result

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
        result: Remembered = await self._submit(
            Put(user_id, app, content, new_id, now, origin, once)
        )
        return result

    async def get(self, user_id: str, app: str, id: str, now: datetime) -> Notification | None:
        async with translated(), self._acquire() as conn:
            return await _live(conn, user_id, app, id, now)

    async def list(self, user_id: str, app: str, query: Query, now: datetime) -> Page:
        where, params = feed_where(POSTGRES, user_id, app, query.filter, now)
        sql = (
            f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE {where}"
            f" ORDER BY {order_by(query.order)}"
            f" LIMIT ${len(params) + 1} OFFSET ${len(params) + 2}"
        )
        async with translated(), self._acquire() as conn:
            if not query.count:
                rows = await conn.fetch(sql, *params, query.top, query.skip)
                return Page([_from_row(r) for r in rows])
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(sql, *params, query.top, query.skip)
                total = await conn.fetchval(
                    f"SELECT count(*) FROM notifications WHERE {where}", *params
                )
        return Page([_from_row(r) for r in rows], int(total))

    async def count(self, user_id: str, app: str, filter: Filter | None, now: datetime) -> int:
        where, params = feed_where(POSTGRES, user_id, app, filter, now)
        async with translated(), self._acquire() as conn:
            total = await conn.fetchval(
                f"SELECT count(*) FROM notifications WHERE {where}", *params
            )
        return int(total)

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
        async def run(tx: Tx) -> Notification:
            old = await _live(tx.conn, user_id, app, id, now)
            if old is None:
                raise NotFound(f"notification {id} not found")
            check_etag(old, if_match)
            n = patched(old, patch, now)
            await _write_rows(tx.conn, _UPDATE_SQL, [n])
            tx.append(user_id, ChangeKind.UPDATED, app, n.id, now, origin)
            return n

        result: Notification = await self._submit(Op(user_id, run))
        return result

    async def delete(
        self,
        user_id: str,
        app: str,
        id: str,
        if_match: int | None,
        now: datetime,
        origin: str | None = None,
    ) -> None:
        async def run(tx: Tx) -> None:
            old = await _live(tx.conn, user_id, app, id, now)
            if old is None:
                raise NotFound(f"notification {id} not found")
            check_etag(old, if_match)
            await tx.conn.execute("DELETE FROM notifications WHERE id = $1", id)
            tx.append(user_id, ChangeKind.DELETED, app, id, now, origin)

        await self._submit(Op(user_id, run))

    async def delete_group(
        self, user_id: str, app: str, group_name: str, now: datetime, origin: str | None = None
    ) -> int:
        async def run(tx: Tx) -> int:
            rows = await tx.conn.fetch(
                "DELETE FROM notifications WHERE user_id = $1 AND app = $2 AND group_name = $3"
                " AND expiration_date_time > $4 RETURNING id, created_date_time",
                user_id,
                app,
                group_name,
                now,
            )
            for r in sorted(rows, key=lambda r: (r["created_date_time"], r["id"])):
                tx.append(user_id, ChangeKind.DELETED, app, r["id"], now, origin)
            return len(rows)

        result: int = await self._submit(Op(user_id, run))
        return result

    # -- change log ----------------------------------------------------------------------------
    async def changes(
        self, user_id: str, app: str | None, after: int, limit: int
    ) -> builtins.list[Change]:
        params: list[object] = [datetime.now(UTC), user_id, after, limit]
        app_clause = ""
        if app is not None:
            params.append(app)
            app_clause = " AND c.app = $5"
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(_CHANGES_SQL.format(app_clause=app_clause), *params)
        return [change_from_row(user_id, tuple(r), _identity) for r in rows]

    async def horizon(self, user_id: str) -> tuple[int, int]:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT pruned, position FROM feed_heads WHERE user_id = $1", user_id
            )
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def sweep(self, now: datetime, retain_changes_until: datetime, limit: int) -> int:
        expired: int = await self._exclusive(
            lambda conn: _sweep(conn, now, retain_changes_until, limit)
        )
        if expired:
            self._hooks.fire()
        return expired

    # -- outbox --------------------------------------------------------------------------------
    async def pending(self, limit: int) -> builtins.list[Pending]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(_PENDING_SQL, datetime.now(UTC), limit)
        return [pending_from_row(tuple(r), _identity) for r in rows]

    async def dispatched(self, seqs: Sequence[int], deliveries: Sequence[NewDelivery] = ()) -> None:
        """Two statements in one transaction. The first removes the entries and answers which
        ones it removed: another node removing one of them at the same time makes it wait for
        that node's commit, then skip the entry. The second, with a snapshot taken after that
        commit (so it sees the deliveries the other node queued), supersedes for the removed
        entries and queues the deliveries of those only."""
        if not seqs:
            return  # no entry removed: no delivery may be queued
        keys = list(seqs)
        created = datetime.now(UTC)
        changes = [(d.user_id, d.message.position) for d in deliveries]
        columns: list[list[object]] = [[] for _ in range(9)]
        for d in deliveries:
            m = d.message
            values = (
                d.subscription_id,
                d.user_id,
                d.app,
                d.provider.value,
                encode_message(m),
                m.notification_id,
                m.position,
                m.expires,
                d.due,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)

        async def run(tx: Tx) -> None:
            removed = await tx.conn.fetch(_OUTBOX_REMOVE_SQL, keys)
            if not removed:
                return
            mine = {(r[0], r[1]) for r in removed}
            rows = columns
            if not mine.issuperset(changes):  # some entries were gone: queue for the rest only
                keep = [i for i, change in enumerate(changes) if change in mine]
                rows = [[column[i] for i in keep] for column in columns]
            superseding = [r for r in removed if r[2] is not None]
            await tx.conn.execute(
                _DISPATCHED_SQL,
                [r[0] for r in superseding],
                [r[2] for r in superseding],
                [r[1] for r in superseding],
                *rows,
                created,
            )

        await self._submit(Op(None, run))

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._hooks.add(callback)

    # -- subscriptions -------------------------------------------------------------------------
    # Writes lock the user's feed head (Op(user_id)): that serialises one user's subscription
    # writes across writers and nodes, so the quota count cannot race.
    async def add_subscription(
        self, sub: Subscription, limit: int, now: datetime
    ) -> tuple[Subscription, bool]:
        async def run(tx: Tx) -> tuple[Subscription, bool]:
            return await _add_subscription(tx.conn, sub, limit, now)

        result: tuple[Subscription, bool] = await self._submit(Op(sub.user_id, run))
        return result

    async def get_subscription(self, id: str, now: datetime) -> Subscription | None:
        async with translated(), self._acquire() as conn:
            return await _live_subscription(conn, id, now)

    async def channel_holder(self, app: str, key: str) -> Subscription | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
                " WHERE app = $1 AND channel_key = $2",
                app,
                key,
            )
        return None if row is None else subscription_from_row(row, _identity)

    async def list_subscriptions(
        self, user_id: str, app: str, now: datetime
    ) -> builtins.list[Subscription]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = $1"
                " AND app = $2 AND expiration_date_time > $3 ORDER BY created_date_time, id",
                user_id,
                app,
                now,
            )
        return [subscription_from_row(r, _identity) for r in rows]

    async def update_subscription(self, sub: Subscription, now: datetime) -> Subscription:
        async def run(tx: Tx) -> Subscription:
            return await _update_subscription(tx.conn, sub, now)

        result: Subscription = await self._submit(Op(sub.user_id, run))
        return result

    async def delete_subscription(self, user_id: str, app: str, id: str) -> None:
        # The protocol passes no `now`: liveness is judged by the clock, as `changes` does.
        now = datetime.now(UTC)

        async def run(tx: Tx) -> None:
            deleted = await tx.conn.fetchval(
                "WITH s AS (DELETE FROM subscriptions WHERE id = $1 AND user_id = $2"
                " AND app = $3 AND expiration_date_time > $4 RETURNING id),"
                " d AS (DELETE FROM deliveries WHERE subscription_id IN (SELECT id FROM s))"
                " SELECT id FROM s",
                id,
                user_id,
                app,
                now,
            )
            if deleted is None:
                raise NotFound(f"subscription {id} not found")

        await self._submit(Op(None, run))

    async def push_targets(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> builtins.list[Subscription]:
        if not pairs:
            return []
        keys = sorted(set(pairs))
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                _PUSH_TARGETS_SQL, [k[0] for k in keys], [k[1] for k in keys], now
            )
        return [subscription_from_row(r, _identity) for r in rows]

    async def seen(self, subscription_id: str, position: int) -> None:
        """Calls that arrive while one is waiting for the writer join it: one statement and one
        commit for all (live streams call this for every change they deliver)."""
        batch, done = self._seen, self._seen_done
        if batch is None or done is None:
            batch = self._seen = {}

            def detach(_: object = None) -> None:
                if self._seen is batch:
                    self._seen = None  # later calls start the next batch

            async def run(tx: Tx) -> None:
                detach()
                keys = sorted(batch)
                await tx.conn.execute(_SEEN_SQL, keys, [batch[k] for k in keys])

            done = self._seen_done = asyncio.ensure_future(self._submit(Op(None, run)))
            done.add_done_callback(detach)  # also if it failed before it ran
        batch[subscription_id] = max(position, batch.get(subscription_id, position))
        # Shielded: one caller cancelled must not cancel the write the others wait for.
        await asyncio.shield(done)

    # -- deliveries ----------------------------------------------------------------------------
    async def claim(
        self, provider: Provider, now: datetime, lease: float, limit: int
    ) -> builtins.list[Delivery]:
        """One statement per round, outside the writer (autocommit): it locks what it picks with
        SKIP LOCKED, so it never waits for another claim or a settle and never deadlocks."""
        until = now + timedelta(seconds=lease)
        claimed: list[Delivery] = []
        async with translated(), self._acquire() as conn:
            for _ in range(CLAIM_ROUNDS):
                if len(claimed) >= limit:
                    break
                rows = await conn.fetch(
                    _CLAIM_SQL,
                    provider.value,
                    now,
                    until,
                    limit - len(claimed),
                    CHANNEL_TAG[provider],
                    [d.id for d in claimed],  # with a lease <= 0 they would be due still
                )
                purged = 0
                for r in rows:
                    if not r["ok"]:
                        purged += 1
                        continue
                    claimed.append(
                        Delivery(
                            id=r["id"],
                            subscription_id=r["subscription_id"],
                            user_id=r["user_id"],
                            app=r["app"],
                            provider=provider,
                            channel=decode_channel(r["push_channel"]),
                            message=decode_message(r["message"]),
                            attempts=r["attempts"],
                            seen_position=r["seen_position"],
                            created=r["created"],
                        )
                    )
                if not purged:
                    break
        return claimed

    async def settle(self, outcomes: Sequence[Settlement], now: datetime) -> None:
        ids = settle_ids(outcomes)
        if not ids:
            return

        async def run(tx: Tx) -> None:
            # Lock the deliveries first, in id order; a stale or duplicate settle waits here.
            found = await tx.conn.fetch(_SETTLE_LOCK_SQL, ids)
            plan = settle_plan(outcomes, {r[0]: Claimed(r[1], r[2], r[3]) for r in found})
            if not plan.delete and not plan.retry and not plan.subscriptions:
                return
            subs = plan.subscriptions
            await tx.conn.execute(
                _SETTLE_SQL,
                list(plan.retry),
                list(plan.retry.values()),
                plan.delete,
                [s.id for s in subs],
                [s.key for s in subs],
                [s.delivered for s in subs],
                [s.failures for s in subs],
                [s.error for s in subs],
                [s.gone for s in subs],
                now,
            )

        await self._submit(Op(None, run))

    async def next_due(self, provider: Provider) -> datetime | None:
        async with translated(), self._acquire() as conn:
            due: datetime | None = await conn.fetchval(
                "SELECT min(due) FROM deliveries WHERE provider = $1", provider.value
            )
        return due

    async def count_deliveries(self, provider: Provider | None = None) -> int:
        async with translated(), self._acquire() as conn:
            if provider is None:
                count = await conn.fetchval("SELECT count(*) FROM deliveries")
            else:
                count = await conn.fetchval(
                    "SELECT count(*) FROM deliveries WHERE provider = $1", provider.value
                )
        return int(count)

    # -- push credentials ----------------------------------------------------------------------
    async def get_push_credentials(self, app: str) -> dict[str, bytes]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch("SELECT kind, secret FROM push_credentials WHERE app = $1", app)
        return {r[0]: bytes(r[1]) for r in rows}

    async def put_push_credentials(
        self, app: str, kind: str, secret: bytes, replace: bool = True
    ) -> bytes:
        updated = datetime.now(UTC)
        conflict = (
            "DO UPDATE SET secret = excluded.secret, updated = excluded.updated"
            if replace
            else "DO NOTHING"
        )

        async def run(tx: Tx) -> bytes:
            await tx.conn.execute(
                "INSERT INTO push_credentials (app, kind, secret, updated)"
                f" VALUES ($1, $2, $3, $4) ON CONFLICT (app, kind) {conflict}",
                app,
                kind,
                secret,
                updated,
            )
            # A statement of its own, so a new snapshot: it sees a row another transaction
            # committed while the insert waited for it (a same-statement read would not).
            stored = await tx.conn.fetchval(
                "SELECT secret FROM push_credentials WHERE app = $1 AND kind = $2", app, kind
            )
            return bytes(stored)

        result: bytes = await self._submit(Op(None, run))
        return result

    async def delete_push_credentials(self, app: str, kind: str) -> bool:
        async def run(tx: Tx) -> bool:
            deleted = await tx.conn.fetchval(
                "DELETE FROM push_credentials WHERE app = $1 AND kind = $2 RETURNING kind",
                app,
                kind,
            )
            return deleted is not None

        result: bool = await self._submit(Op(None, run))
        return result

    # -- idempotency ---------------------------------------------------------------------------
    async def recall(self, scope: str, key: str, now: datetime) -> Remembered | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT fingerprint, status, body, location FROM idempotency"
                " WHERE scope = $1 AND key = $2 AND expires > $3",
                scope,
                key,
                now,
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
        async def run(tx: Tx) -> None:
            # Keep the first answer unless it has expired (the sweeper may not have run yet).
            await tx.conn.execute(
                "INSERT INTO idempotency VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " status = excluded.status, body = excluded.body, location = excluded.location,"
                " expires = excluded.expires WHERE idempotency.expires <= now()",
                scope,
                key,
                fingerprint,
                status,
                body,
                location,
                expires,
            )

        await self._submit(Op(None, run))


# -- migrations --------------------------------------------------------------------------------


async def _migrate(conn: asyncpg.Connection) -> None:
    known = migrations("postgres")
    async with conn.transaction():
        # Several nodes may start at once: one migrates, the others wait and then see it done.
        # A long timeout: another node may be migrating a large table.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('herald-migrate'))", timeout=MIGRATION_TIMEOUT
        )
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        check_version(current, known[-1][0] if known else 0)
        for version, script in known:
            if version > current:
                await conn.execute(script, timeout=MIGRATION_TIMEOUT)
                await conn.execute("INSERT INTO schema_version VALUES ($1)", version)


# -- batch steps -------------------------------------------------------------------------------


async def _transaction(conn: asyncpg.Connection, ops: list[Op]) -> Committed:
    """Run the ops in one transaction; an op that raises before writing fails alone."""
    users = {op.user_id for op in ops if op.user_id is not None}
    async with conn.transaction():
        tx = Tx(conn, await _lock_heads(conn, users))
        outcomes: Outcomes = []
        for op in ops:
            try:
                outcomes.append((True, await op.run(tx)))
            except HeraldError as e:  # raised before the op wrote anything
                outcomes.append((False, e))
        await _flush(tx)
    return outcomes, bool(tx.changes)


_PUT_BATCH_SQL = (
    "SELECT o_ord, o_id, o_version, o_created_at, o_created FROM herald_put_batch($1::text[],"
    " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::timestamptz[], $9::timestamptz[], $10::bytea[], $11::text[])"
)


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
        f" applied ({_describe(e)}). Retry it; an Idempotency-Key makes the retry safe.",
        retry_after=1,
    )


async def _probe(tx: Tx) -> None:
    """`ping`'s write probe: a transaction on a writer's connection, which must be writable."""
    if await tx.conn.fetchval("SELECT current_setting('transaction_read_only')::bool"):
        raise Unavailable("the database is read-only (a standby?)", retry_after=1)


async def _put_batch(conn: asyncpg.Connection, puts: list[Put], again: bool = False) -> Committed:
    """All puts of a call in one statement (its own transaction): `herald_put_batch`; with
    Idempotency-Keys, in a transaction with their records (`_put_recorded`).

    `again`: an earlier call of the same batch may have created a key equal to a put's new id,
    so puts without an appNotificationId look their key up too (and replace what they find)."""
    for p in puts:
        if p.once is not None:
            return await _put_recorded(conn, puts, again)
    return await _put_rows(conn, puts, again)


class _Redo(Exception):
    """Rolls a keyed batch back, to run it again without these puts (by index), settled so:
    keys another transaction recorded first, answers that could not be rendered."""

    def __init__(self, taken: list[int], failed: dict[int, tuple[bool, Any]]) -> None:
        super().__init__(f"{len(taken)} Idempotency-Keys taken, {len(failed)} failed")
        self.taken = taken
        self.failed = failed


async def _put_recorded(conn: asyncpg.Connection, puts: list[Put], again: bool) -> Committed:
    """Puts and the records of their Idempotency-Keys in one transaction (three round trips
    more than `_put_rows` alone, paid only by batches with a key).

    A key another transaction recorded first (another process or node: the insert waits for it
    to end) rolls the whole transaction back; that put is answered with the record, and the
    others run again without it. So does an answer that cannot be rendered (that put fails)."""
    settled: dict[int, tuple[bool, Any]] = {}
    for _ in range(RECORD_ROUNDS):
        rest = [i for i in range(len(puts)) if i not in settled]
        if not rest:
            return [settled[i] for i in range(len(puts))], False
        try:
            async with conn.transaction():
                outcomes, appended = await _put_rows(conn, [puts[i] for i in rest], again)
                answers = _rendered([puts[i] for i in rest], outcomes)
                failed = {rest[j]: a for j, a in enumerate(answers) if isinstance(a, tuple)}
                taken = await _record(conn, [puts[i] for i in rest], answers)
                if taken or failed:
                    raise _Redo([rest[j] for j in taken], failed)
        except _Redo as redo:
            settled |= redo.failed
            recorded = await _recall_taken(conn, puts, redo.taken)
            settled |= {i: (True, r) for i, r in recorded.items()}
            continue
        by_rest = dict(zip(rest, zip(outcomes, answers, strict=True), strict=True))
        merged: Outcomes = []
        for i in range(len(puts)):
            outcome, answer = by_rest[i] if i in by_rest else (settled[i], None)
            merged.append((True, answer) if isinstance(answer, Remembered) else outcome)
        return merged, appended
    raise Unavailable("Idempotency-Keys kept changing hands; try again", retry_after=1)


def _rendered(puts: list[Put], outcomes: Outcomes) -> list[Remembered | tuple[bool, Any] | None]:
    """Each keyed put's answer, rendered from the notification as written (in the transaction);
    a failed outcome where it could not be."""
    answers: list[Remembered | tuple[bool, Any] | None] = []
    for p, (ok, value) in zip(puts, outcomes, strict=True):
        if p.once is None or not ok:
            answers.append(None)
            continue
        try:
            answers.append(p.once.render(*value))
        except Exception as e:
            log.exception("could not render an idempotent answer")
            answers.append((False, HeraldError(f"could not render the answer: {e!r}")))
    return answers


async def _record(
    conn: asyncpg.Connection, puts: list[Put], answers: list[Remembered | tuple[bool, Any] | None]
) -> list[int]:
    """Insert the answers as the keys' records; the positions (in `puts`) of the keys another
    transaction holds an unexpired record of."""
    rows = [
        (j, p.once, a)
        for j, (p, a) in enumerate(zip(puts, answers, strict=True))
        if p.once is not None and isinstance(a, Remembered)
    ]
    if not rows:
        return []
    now = min(puts[j].now for j, _, _ in rows)
    inserted = await conn.fetch(
        _RECORD_SQL,
        [once.scope for _, once, _ in rows],
        [once.key for _, once, _ in rows],
        [a.fingerprint for _, _, a in rows],
        [a.status for _, _, a in rows],
        [a.body for _, _, a in rows],
        [a.location for _, _, a in rows],
        [once.expires for _, once, _ in rows],
        now,
    )
    stored = {(r[0], r[1]) for r in inserted}
    return [j for j, once, _ in rows if (once.scope, once.key) not in stored]


async def _recall_taken(
    conn: asyncpg.Connection, puts: list[Put], taken: list[int]
) -> dict[int, Remembered]:
    """The records that took these puts' keys (committed: the insert waited for them). One that
    has expired or been swept meanwhile is missing, and its put runs again."""
    if not taken:
        return {}
    keys = [(i, puts[i].once) for i in taken]
    found = await conn.fetch(
        "SELECT i.n, r.fingerprint, r.status, r.body, r.location"
        " FROM unnest($1::text[], $2::text[], $3::int[]) AS i(scope, key, n)"
        " JOIN idempotency r ON r.scope = i.scope AND r.key = i.key AND r.expires > $4",
        [once.scope for _, once in keys if once],
        [once.key for _, once in keys if once],
        [i for i, once in keys if once],
        min(puts[i].now for i in taken),
    )
    return {r[0]: Remembered(r[1], r[2], bytes(r[3]), r[4]) for r in found}


# Keeps an unexpired record (the first answer): a conflicting row is locked and not returned.
# Replaces an expired one the sweeper has not removed yet.
_RECORD_SQL = (
    "INSERT INTO idempotency (scope, key, fingerprint, status, body, location, expires)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bytea[],"
    " $6::text[], $7::timestamptz[])"
    " ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " status = excluded.status, body = excluded.body, location = excluded.location,"
    " expires = excluded.expires WHERE idempotency.expires <= $8"
    " RETURNING scope, key"
)


async def _put_rows(conn: asyncpg.Connection, puts: list[Put], again: bool) -> Committed:
    """`herald_put_batch` over the puts."""
    # As if created; replaced rows are patched below.
    built = [
        new_notification(p.user_id, p.app, p.content, p.new_id, p.now.astimezone(UTC), None)
        for p in puts
    ]
    rows = await conn.fetch(
        _PUT_BATCH_SQL,
        [p.user_id for p in puts],
        [p.app for p in puts],
        [p.content.app_notification_id or (p.new_id if again else None) for p in puts],
        [p.new_id for p in puts],
        [n.target_host_name for n in built],
        [n.group_name for n in built],
        [n.priority.value for n in built],
        [n.last_modified_date_time for n in built],
        [n.expiration_date_time for n in built],
        [encode_content(n) for n in built],
        [p.origin for p in puts],
    )
    outcomes: list[tuple[bool, Any] | None] = [None] * len(puts)
    for ordinal, id, version, created_at, created in rows:
        n = built[ordinal - 1]
        if not created:
            n = msgspec.structs.replace(n, id=id, version=version, created_date_time=created_at)
        outcomes[ordinal - 1] = (True, (n, created))
    # Cannot happen (the function answers every put). Not an exception: the call has committed,
    # and a retry of its puts would apply them twice.
    missing = (False, HeraldError("herald_put_batch did not answer this put"))
    return [missing if o is None else o for o in outcomes], bool(rows)


async def _put_again(conn: asyncpg.Connection, puts: list[Put]) -> Committed:
    return await _put_batch(conn, puts, again=True)


async def _lock_heads(conn: asyncpg.Connection, users: Iterable[str]) -> dict[str, int]:
    """Lock (creating if needed) the users' head rows in user id order; their current positions."""
    ordered = sorted(users)
    if not ordered:
        return {}
    rows = await conn.fetch(
        "INSERT INTO feed_heads (user_id)"
        " SELECT u FROM unnest($1::text[]) WITH ORDINALITY AS t(u, i) ORDER BY i"
        " ON CONFLICT (user_id) DO UPDATE SET position = feed_heads.position"
        " RETURNING user_id, position",
        ordered,
    )
    return {r[0]: int(r[1]) for r in rows}


async def _flush(tx: Tx) -> None:
    if not tx.changes:
        return
    users, positions, kinds, apps, ids, ats, origins = zip(*tx.changes, strict=True)
    await tx.conn.execute(_APPEND_SQL, users, positions, kinds, apps, ids, ats, origins)
    touched = sorted({c[0] for c in tx.changes})
    await tx.conn.execute(
        "UPDATE feed_heads SET position = t.p FROM unnest($1::text[], $2::bigint[]) AS t(u, p)"
        " WHERE feed_heads.user_id = t.u",
        touched,
        [tx.heads[u] for u in touched],
    )


# The changes and their outbox rows in one statement. The sort runs below the outbox insert, so
# seqs are drawn in position order (and after the head locks this transaction holds).
_APPEND_SQL = (
    "WITH appended AS (INSERT INTO changes"
    f" (user_id, {', '.join(CHANGE_COLUMNS)})"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
    " $6::timestamptz[], $7::text[]) RETURNING user_id, position)"
    " INSERT INTO outbox (user_id, position)"
    " SELECT user_id, position FROM appended ORDER BY user_id, position"
)
_ARRAYS = (
    "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::timestamptz[],"
    " $13::int[], $14::bytea[])"
)
_INSERT_SQL = f"INSERT INTO notifications ({NOTIFICATION_COLUMNS}) SELECT * FROM {_ARRAYS}"
_UPDATE_SQL = (
    f"UPDATE notifications SET ({NOTIFICATION_COLUMNS}) = ({_prefixed('t')})"
    f" FROM {_ARRAYS} AS t({NOTIFICATION_COLUMNS}) WHERE notifications.id = t.id"
)


async def _write_rows(conn: asyncpg.Connection, sql: str, rows: Iterable[Notification]) -> None:
    """Run `sql` once over all rows, passed column-wise as arrays (one round trip)."""
    columns: list[list[object]] = [[] for _ in range(14)]
    for n in rows:
        values = (
            n.id,
            n.user_id,
            n.app,
            n.app_notification_id,
            n.target_host_name,
            n.group_name,
            n.priority.value,
            n.read_state.value,
            n.user_action_state.value,
            n.created_date_time,
            n.last_modified_date_time,
            n.expiration_date_time,
            n.version,
            encode_content(n),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    if columns[0]:
        await conn.execute(sql, *columns)


async def _sweep(
    conn: asyncpg.Connection, now: datetime, retain_until: datetime, limit: int
) -> int:
    candidates = await conn.fetch(
        "SELECT user_id FROM notifications WHERE expiration_date_time <= $1"
        " ORDER BY expiration_date_time LIMIT $2",
        now,
        limit,
    )
    prunable = await conn.fetch(
        "SELECT user_id, max(position) FROM changes WHERE at < $1 GROUP BY user_id", retain_until
    )
    tx = Tx(conn, await _lock_heads(conn, {r[0] for r in candidates} | {r[0] for r in prunable}))
    # Re-select under the locks: only users locked above may be touched.
    expired = await conn.fetch(
        "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications"
        " WHERE expiration_date_time <= $1 AND user_id = ANY($2::text[])"
        " ORDER BY expiration_date_time LIMIT $3) RETURNING id, user_id, app",
        now,
        list(tx.heads),
        limit,
    )
    for r in expired:
        tx.append(r["user_id"], ChangeKind.EXPIRED, r["app"], r["id"], now)
    await _flush(tx)
    if prunable:
        # Prune whole prefixes of each log, so everything at or below `pruned` is gone.
        users, positions = [r[0] for r in prunable], [r[1] for r in prunable]
        await conn.execute(
            "UPDATE feed_heads SET pruned = greatest(pruned, t.p)"
            " FROM unnest($1::text[], $2::bigint[]) AS t(u, p) WHERE feed_heads.user_id = t.u",
            users,
            positions,
        )
        await conn.execute(
            "DELETE FROM changes c USING unnest($1::text[], $2::bigint[]) AS t(u, p)"
            " WHERE c.user_id = t.u AND c.position <= t.p",
            users,
            positions,
        )
        # Entries whose change was pruned can no longer be announced (a device that missed
        # them is behind the horizon and must resync anyway). The outbox is normally near
        # empty, so a scan of it beats an index every append would pay for.
        await conn.execute(
            "DELETE FROM outbox o USING unnest($1::text[], $2::bigint[]) AS t(u, p)"
            " WHERE o.user_id = t.u AND o.position <= t.p",
            users,
            positions,
        )
    await conn.execute(
        "WITH s AS (DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
        " WHERE expiration_date_time <= $1 ORDER BY expiration_date_time LIMIT $2) RETURNING id)"
        f" {_DELETE_DELIVERIES_OF_S}",
        now,
        limit,
    )
    await conn.execute("DELETE FROM idempotency WHERE expires <= $1", now)
    return len(expired)


# -- subscriptions -----------------------------------------------------------------------------


async def _add_subscription(
    conn: asyncpg.Connection, sub: Subscription, limit: int, now: datetime
) -> tuple[Subscription, bool]:
    key = channel_key(sub)
    holder = None if key is None else await _channel_holder(conn, sub.app, key)
    if holder is not None and holder.user_id == sub.user_id and holder.expiration_date_time > now:
        stored = stored_subscription(sub, holder)  # the same device again: update it in place
        await conn.execute(_SUBSCRIPTION_UPDATE_SQL, *_subscription_update(stored), True)
        return stored, False
    # Checked before any write: an op that raises after writing would abort its batch.
    live = await conn.fetchval(
        "SELECT count(*) FROM subscriptions WHERE user_id = $1 AND app = $2"
        " AND expiration_date_time > $3",
        sub.user_id,
        sub.app,
        now,
    )
    if live >= limit:
        raise QuotaExceeded(f"at most {limit} subscriptions per user and app")
    if holder is not None:  # another user's, or expired: the channel now belongs to `sub`
        await conn.execute(
            "WITH s AS (DELETE FROM subscriptions WHERE id = $1 RETURNING id)"
            f" {_DELETE_DELIVERIES_OF_S}",
            holder.id,
        )
    stored = stored_subscription(sub)
    await conn.execute(_SUBSCRIPTION_INSERT_SQL, *_subscription_row(stored))
    return stored, True


async def _update_subscription(
    conn: asyncpg.Connection, sub: Subscription, now: datetime
) -> Subscription:
    old = await _live_subscription(conn, sub.id, now)
    if old is None or (old.user_id, old.app) != (sub.user_id, sub.app):
        raise NotFound(f"subscription {sub.id} not found")
    key = channel_key(sub)
    if key is not None:
        await conn.execute(
            "WITH s AS (DELETE FROM subscriptions WHERE app = $1 AND channel_key = $2"
            f" AND id <> $3 RETURNING id) {_DELETE_DELIVERIES_OF_S}",
            sub.app,
            key,
            sub.id,
        )
    # A new channel starts with a fresh delivery state; the same one keeps its history.
    reset = key != channel_key(old)
    stored = stored_subscription(sub, old, reset)
    await conn.execute(_SUBSCRIPTION_UPDATE_SQL, *_subscription_update(stored), reset)
    return stored


async def _channel_holder(conn: asyncpg.Connection, app: str, key: str) -> Subscription | None:
    """The subscription holding a push channel of the app, expired or not."""
    row = await conn.fetchrow(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE app = $1 AND channel_key = $2",
        app,
        key,
    )
    return None if row is None else subscription_from_row(row, _identity)


async def _live_subscription(
    conn: asyncpg.Connection, id: str, now: datetime
) -> Subscription | None:
    row = await conn.fetchrow(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
        " WHERE id = $1 AND expiration_date_time > $2",
        id,
        now,
    )
    return None if row is None else subscription_from_row(row, _identity)


def _subscription_row(s: Subscription) -> tuple[object, ...]:
    return (
        s.id,
        s.user_id,
        s.app,
        s.platform.value,
        s.display_name,
        encode_channel(s.push_channel),
        channel_key(s),
        s.expiration_date_time,
        s.created_date_time,
        s.last_modified_date_time,
    )


def _subscription_update(s: Subscription) -> tuple[object, ...]:
    return (
        s.id,
        s.platform.value,
        s.display_name,
        encode_channel(s.push_channel),
        channel_key(s),
        s.expiration_date_time,
        s.last_modified_date_time,
    )


_SUBSCRIPTION_INSERT_SQL = (
    "INSERT INTO subscriptions (id, user_id, app, platform, display_name, push_channel,"
    " channel_key, expiration_date_time, created_date_time, last_modified_date_time)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
# Owner, app, creation time and seen position are never changed; $8: reset the DeliveryState.
_SUBSCRIPTION_UPDATE_SQL = (
    "UPDATE subscriptions SET (platform, display_name, push_channel, channel_key,"
    " expiration_date_time, last_modified_date_time) = ($2, $3, $4, $5, $6, $7),"
    " last_delivered = CASE WHEN $8 THEN NULL ELSE last_delivered END,"
    " consecutive_failures = CASE WHEN $8 THEN 0 ELSE consecutive_failures END,"
    " last_error = CASE WHEN $8 THEN NULL ELSE last_error END,"
    " gone = CASE WHEN $8 THEN NULL ELSE gone END"
    " WHERE id = $1"
)
# After a CTE `s` that deleted subscriptions (RETURNING id): their deliveries go too.
_DELETE_DELIVERIES_OF_S = "DELETE FROM deliveries WHERE subscription_id IN (SELECT id FROM s)"


# -- deliveries --------------------------------------------------------------------------------

_PUSH_TARGETS_SQL = (
    f"SELECT {', '.join('s.' + col.strip() for col in SUBSCRIPTION_COLUMNS.split(','))}"
    " FROM subscriptions s JOIN unnest($1::text[], $2::text[]) AS k(u, a)"
    " ON s.user_id = k.u AND s.app = k.a"
    " WHERE s.push_channel IS NOT NULL AND s.expiration_date_time > $3 AND s.gone IS NULL"
    " ORDER BY s.user_id, s.app, s.created_date_time, s.id"
)
# Sorted ids: rows are locked in id order, as `settle` locks them.
_SEEN_SQL = (
    "UPDATE subscriptions s SET seen_position = t.p"
    " FROM unnest($1::text[], $2::bigint[]) AS t(id, p)"
    " WHERE s.id = t.id AND s.seen_position < t.p"
)
# Removes outbox entries; answers, of those that were still there, (user_id, position) and the
# notification whose queued deliveries the change supersedes (a subquery: one primary key probe
# per entry, never a scan of the change log). NULL if there can be none: the change was pruned,
# or it created the notification (a new id: nothing was queued for it before).
_OUTBOX_REMOVE_SQL = (
    "DELETE FROM outbox o WHERE o.seq = ANY($1::bigint[]) RETURNING o.user_id, o.position,"
    " (SELECT c.notification_id FROM changes c WHERE c.user_id = o.user_id"
    f" AND c.position = o.position AND c.kind <> '{ChangeKind.CREATED.value}')"
)
# For the superseding entries ($1-$3): delete the queued deliveries of each one's notification
# with an older position, then queue the new deliveries (all of them of removed entries).
# `found`: per entry, the index probes of (subscription_id, notification_id) for the user's
# subscriptions (see deliveries_subscription in 0003_push.sql); OFFSET 0 keeps the subquery per
# entry, so it stays probes whatever the table sizes and statistics (never a scan of the queue).
# `doomed`: those rows locked in id order, as `settle` locks them.
_DISPATCHED_SQL = (
    "WITH found AS (SELECT f.id FROM unnest($1::text[], $2::text[], $3::bigint[]) AS o(u, n, p)"
    " CROSS JOIN LATERAL (SELECT d.id FROM deliveries d WHERE d.subscription_id ="
    " ANY(ARRAY(SELECT s.id FROM subscriptions s WHERE s.user_id = o.u))"
    " AND d.notification_id = o.n AND d.position < o.p AND d.user_id = o.u OFFSET 0) AS f),"
    " doomed AS (SELECT d.id FROM deliveries d WHERE d.id = ANY(ARRAY(SELECT id FROM found))"
    " ORDER BY d.id FOR UPDATE),"
    " superseded AS (DELETE FROM deliveries WHERE id = ANY(ARRAY(SELECT id FROM doomed)))"
    " INSERT INTO deliveries (subscription_id, user_id, app, provider, message, notification_id,"
    " position, expires, due, created)"
    " SELECT t.*, $13 FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[],"
    " $9::text[], $10::bigint[], $11::timestamptz[], $12::timestamptz[]) AS t"
)
# One claim round. `cand`: the first due rows of the provider that no other transaction holds
# (SKIP LOCKED), each with whether it can still be sent; the others are purged, these leased.
# Every row of `cand` comes back (ok false: purged) so the caller knows to claim again.
_CLAIM_SQL = (
    "WITH cand AS (SELECT d.id, d.due, s.push_channel, s.seen_position,"
    " coalesce(s.expiration_date_time > $2 AND s.gone IS NULL AND d.expires > $2"
    " AND (s.push_channel::json ->> 'type') = $5, false) AS ok"
    " FROM deliveries d LEFT JOIN subscriptions s ON s.id = d.subscription_id"
    " WHERE d.provider = $1 AND d.due <= $2 AND d.id <> ALL($6::bigint[])"
    " ORDER BY d.due, d.id LIMIT $4 FOR UPDATE OF d SKIP LOCKED),"
    " purged AS (DELETE FROM deliveries d USING cand WHERE d.id = cand.id AND NOT cand.ok),"
    " leased AS (UPDATE deliveries d SET due = $3, attempts = d.attempts + 1 FROM cand"
    " WHERE d.id = cand.id AND cand.ok"
    " RETURNING d.id, d.subscription_id, d.user_id, d.app, d.message, d.attempts, d.created)"
    " SELECT cand.ok, l.id, l.subscription_id, l.user_id, l.app, l.message, l.attempts,"
    " l.created, cand.push_channel, cand.seen_position"
    " FROM cand LEFT JOIN leased l ON l.id = cand.id ORDER BY cand.due, cand.id"
)
# The deliveries a settle names, locked, with their subscription's current channel key.
# (A subquery: one primary key probe per delivery, never a scan of the subscriptions.)
_SETTLE_LOCK_SQL = (
    "SELECT d.id, d.subscription_id, d.attempts,"
    " (SELECT s.channel_key FROM subscriptions s WHERE s.id = d.subscription_id)"
    " FROM deliveries d WHERE d.id = ANY($1::bigint[]) ORDER BY d.id FOR UPDATE"
)
# A settle plan (see sql.settle_plan) in one statement; the rows each part touches are disjoint.
# A subscription is updated only if its channel key is still the one the plan saw (re-checked on
# the row as locked); only then does its GONE take its other deliveries (ARRAY(): computed once,
# so both sides of the OR are index scans).
_SETTLE_SQL = (
    "WITH subs AS (UPDATE subscriptions s SET"
    " consecutive_failures = CASE WHEN t.delivered THEN 0 ELSE s.consecutive_failures END"
    " + t.failures,"
    " last_error = CASE WHEN t.failures > 0 THEN t.error WHEN t.delivered THEN NULL"
    " ELSE s.last_error END,"
    " last_delivered = CASE WHEN t.delivered THEN $10 ELSE s.last_delivered END,"
    " gone = CASE WHEN t.gone THEN $10 ELSE s.gone END"
    " FROM unnest($4::text[], $5::text[], $6::bool[], $7::int[], $8::text[], $9::bool[])"
    " AS t(id, key, delivered, failures, error, gone)"
    " WHERE s.id = t.id AND s.channel_key = t.key RETURNING s.id, t.gone),"
    " retried AS (UPDATE deliveries d SET due = t.due"
    " FROM unnest($1::bigint[], $2::timestamptz[]) AS t(id, due) WHERE d.id = t.id)"
    " DELETE FROM deliveries WHERE id = ANY($3::bigint[])"
    " OR subscription_id = ANY(ARRAY(SELECT id FROM subs WHERE gone))"
)


# -- reads -------------------------------------------------------------------------------------


LAST_CLIENT = "this is the app's last client id: remove the app instead (herald app delete)"


async def _client_exists(conn: asyncpg.Connection, client_id: str) -> bool:
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM app_clients WHERE client_id = $1)", client_id
    )
    return bool(found)


async def _insert_client(conn: asyncpg.Connection, app: App) -> None:
    await conn.execute(
        "INSERT INTO app_clients VALUES ($1, $2, $3, $4, $5)",
        app.client_id,
        app.host_name,
        app.platform,
        app.secret_hash,
        app.created_date_time,
    )


# A change row and the notification as it is now (NULL columns once deleted or expired).
_CHANGE_FIELDS = ", ".join(f"c.{col}" for col in CHANGE_COLUMNS) + ", " + _prefixed("n")
_NOW_JOIN = (
    " LEFT JOIN notifications n ON n.id = c.notification_id"
    f" AND n.user_id = c.user_id AND c.kind IN {LIVE_KINDS}"
    " AND n.expiration_date_time > $1"
)
_CHANGES_SQL = (
    f"SELECT {_CHANGE_FIELDS} FROM changes c{_NOW_JOIN}"
    " WHERE c.user_id = $2 AND c.position > $3{app_clause} ORDER BY c.position LIMIT $4"
)
# Inner join: an entry whose change was pruned is skipped (sweep removes it).
_PENDING_SQL = (
    f"SELECT o.seq, o.user_id, {_CHANGE_FIELDS} FROM outbox o"
    f" JOIN changes c ON c.user_id = o.user_id AND c.position = o.position{_NOW_JOIN}"
    " ORDER BY o.seq LIMIT $2"
)


async def _live(
    conn: asyncpg.Connection, user_id: str, app: str, id: str, now: datetime
) -> Notification | None:
    row = await conn.fetchrow(
        f"SELECT {NOTIFICATION_COLUMNS} FROM notifications"
        " WHERE id = $1 AND user_id = $2 AND app = $3 AND expiration_date_time > $4",
        id,
        user_id,
        app,
        now,
    )
    return None if row is None else _from_row(row)
