"""The PostgreSQL store: asyncpg pool, a few batching writer tasks, one statement per put batch.

Every write transaction first locks the `feed_heads` rows of all users it touches, in one statement
and in byte order of user id: that serialises writers per user (several writer tasks, several
Herald nodes) without deadlocks, and positions are then allocated from those rows, so they commit
gap-free and in order.

Puts, the hot path, go to the server-side function `herald_put_batch` (see the migration): a whole
batch is one statement outside an explicit transaction, i.e. one round trip and its own
transaction. Other writes are rarer and run as a batch transaction driven from here.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from herald.errors import Conflict, HeraldError, NotFound, Unavailable
from herald.model import App, Change, ChangeKind, Content, Notification, StatePatch
from herald.query import Filter, Page, Query
from herald.store.base import Remembered
from herald.store.sql import (
    NOTIFICATION_COLUMNS,
    POSTGRES,
    change_from_row,
    check_etag,
    check_version,
    encode_content,
    feed_where,
    migrations,
    new_notification,
    notification_from_row,
    order_by,
)

MAX_BATCH = 4096
# Batches in flight at once, each on its own pooled connection. One is enough to be correct; with
# two, one batch is prepared and answered in Python while the other is in the database (where
# batches share users, the head locks order the second after the first). Measured on 2 cores.
WRITERS = 2
# A writer finding this many calls waiting and another writer idle takes half, so that both work.
SPLIT_AT = 32
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Let only `herald.errors` escape: the one place asyncpg exceptions are mapped."""
    try:
        yield
    except HeraldError:
        raise
    except asyncpg.UniqueViolationError as e:
        raise Conflict(f"conflicting record: {e}") from e
    except (*_CONNECTION_ERRORS, asyncpg.DeadlockDetectedError) as e:
        raise Unavailable(f"database unavailable: {e}", retry_after=1) from e
    except asyncpg.PostgresError as e:
        raise HeraldError(f"database error: {e}") from e


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
    changes: list[tuple[str, int, str, str, str, datetime]] = field(default_factory=list)

    def append(self, user_id: str, kind: ChangeKind, app: str, nid: str, at: datetime) -> None:
        self.heads[user_id] += 1
        self.changes.append((user_id, self.heads[user_id], kind.value, app, nid, at))


@dataclass(slots=True)
class Put:
    user_id: str
    app: str
    content: Content
    new_id: str
    now: datetime


@dataclass(slots=True)
class Op:
    """Any other write: `run` reads and writes through the transaction, checking before writing."""

    user_id: str | None
    run: Callable[[Tx], Awaitable[Any]]


@dataclass(slots=True)
class _Call:
    work: Put | Op
    future: asyncio.Future[Any]


class _Link:
    """A writer's pooled connection, kept across batches: no acquire and reset per batch."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._conn: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection:
        if self._conn is None:
            self._conn = await self._store._acquire()
        return self._conn

    async def check(self) -> None:
        """After a failure: a broken connection goes back to the pool, which replaces it."""
        if self._conn is not None and self._conn.is_closed():
            await self.release()

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        pool = self._store._pool
        if conn is not None and pool is not None:
            with contextlib.suppress(Exception):
                await pool.release(conn)


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        server_settings: dict[str, str] | None = None,
        writers: int = WRITERS,
    ) -> None:
        self.url = url
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
        await self._pool.close()
        self._pool = None

    def _acquire(self) -> Any:
        if self._pool is None:
            raise Unavailable("store is closed")
        return self._pool.acquire()

    async def ping(self) -> None:
        async with translated(), self._acquire() as conn:
            await conn.fetchval("SELECT 1")

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
        finally:
            await link.release()

    async def _commit(
        self,
        link: _Link,
        batch: list[_Call],
        run: Callable[[asyncpg.Connection, list[Any]], Awaitable[list[tuple[bool, Any]]]],
    ) -> None:
        """Commit the batch in one transaction; if the database rejects it, retry each call in a
        transaction of its own so only the offending call fails."""
        try:
            async with translated():
                conn = await link.connection()
                try:
                    outcomes = await run(conn, [c.work for c in batch])
                finally:
                    await link.check()
        except HeraldError as e:
            if len(batch) > 1:
                for call in batch:
                    await self._commit(link, [call], run)
                return
            outcomes = [(False, e)]
        except BaseException as e:  # cancelled during close: nobody is left to answer
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(Unavailable(f"store closed: {e!r}"))
            raise
        for call, (ok, value) in zip(batch, outcomes, strict=True):
            if call.future.done():
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)

    async def _exclusive(self, run: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """A write that must pick its users itself (sweep): its own transaction, outside batches."""
        async with translated(), self._acquire() as conn, conn.transaction():
            return await run(conn)

    # -- apps ----------------------------------------------------------------------------------
    async def add_app(self, app: App) -> None:
        async def run(tx: Tx) -> None:
            # DO NOTHING instead of an error: an error would abort the whole batch transaction.
            added = await tx.conn.fetchval(
                "INSERT INTO apps VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"
                " RETURNING client_id",
                app.client_id,
                app.host_name,
                app.display_name,
                app.secret_hash,
                app.created_date_time,
            )
            if added is None:
                raise Conflict("an app with this client id or host name exists")

        await self._submit(Op(None, run))

    async def get_app(self, client_id: str) -> App | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(f"{_APP_SELECT} WHERE client_id = $1", client_id)
        return None if row is None else App(**dict(row))

    async def list_apps(self) -> list[App]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(f"{_APP_SELECT} ORDER BY host_name")
        return [App(**dict(r)) for r in rows]

    # -- notifications -------------------------------------------------------------------------
    async def put(
        self, user_id: str, app: str, content: Content, new_id: str, now: datetime
    ) -> tuple[Notification, bool]:
        result: tuple[Notification, bool] = await self._submit(
            Put(user_id, app, content, new_id, now)
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
    ) -> Notification:
        async def run(tx: Tx) -> Notification:
            old = await _live(tx.conn, user_id, app, id, now)
            if old is None:
                raise NotFound(f"notification {id} not found")
            check_etag(old, if_match)
            changes = {k: v for k, v in msgspec.structs.asdict(patch).items() if v is not None}
            if "expiration_date_time" in changes:
                changes["expiration_date_time"] = changes["expiration_date_time"].astimezone(UTC)
            n = msgspec.structs.replace(
                old, **changes, version=old.version + 1, last_modified_date_time=now.astimezone(UTC)
            )
            await _write_rows(tx.conn, _UPDATE_SQL, [n])
            tx.append(user_id, ChangeKind.UPDATED, app, n.id, now)
            return n

        result: Notification = await self._submit(Op(user_id, run))
        return result

    async def delete(
        self, user_id: str, app: str, id: str, if_match: int | None, now: datetime
    ) -> None:
        async def run(tx: Tx) -> None:
            old = await _live(tx.conn, user_id, app, id, now)
            if old is None:
                raise NotFound(f"notification {id} not found")
            check_etag(old, if_match)
            await tx.conn.execute("DELETE FROM notifications WHERE id = $1", id)
            tx.append(user_id, ChangeKind.DELETED, app, id, now)

        await self._submit(Op(user_id, run))

    async def delete_group(self, user_id: str, app: str, group_name: str, now: datetime) -> int:
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
                tx.append(user_id, ChangeKind.DELETED, app, r["id"], now)
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
        return expired

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
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('herald-migrate'))")
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        check_version(current, known[-1][0] if known else 0)
        for version, script in known:
            if version > current:
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_version VALUES ($1)", version)


# -- batch steps -------------------------------------------------------------------------------


async def _transaction(conn: asyncpg.Connection, ops: list[Op]) -> list[tuple[bool, Any]]:
    """Run the ops in one transaction; an op that raises before writing fails alone."""
    users = {op.user_id for op in ops if op.user_id is not None}
    async with conn.transaction():
        tx = Tx(conn, await _lock_heads(conn, users))
        outcomes: list[tuple[bool, Any]] = []
        for op in ops:
            try:
                outcomes.append((True, await op.run(tx)))
            except HeraldError as e:  # raised before the op wrote anything
                outcomes.append((False, e))
        await _flush(tx)
    return outcomes


_PUT_BATCH_SQL = (
    "SELECT o_ord, o_id, o_version, o_created_at, o_created FROM herald_put_batch($1::text[],"
    " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::timestamptz[], $9::timestamptz[], $10::bytea[])"
)


def _generations(calls: list[_Call]) -> list[list[_Call]]:
    """Split puts so that no key occurs twice in one `herald_put_batch` call: the k-th put of a
    key (user, app, appNotificationId or else the new id) goes to the k-th call."""
    seen: dict[tuple[str, str, str], int] = {}
    generations: list[list[_Call]] = []
    for call in calls:
        p = call.work
        assert isinstance(p, Put)
        key = (p.user_id, p.app, p.content.app_notification_id or p.new_id)
        k = seen.get(key, 0)
        seen[key] = k + 1
        if k == len(generations):
            generations.append([])
        generations[k].append(call)
    return generations


async def _put_batch(
    conn: asyncpg.Connection, puts: list[Put], again: bool = False
) -> list[tuple[bool, Any]]:
    """All puts of a call in one statement (its own transaction): `herald_put_batch`.

    `again`: an earlier call of the same batch may have created a key equal to a put's new id,
    so puts without an appNotificationId look their key up too (and replace what they find)."""
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
    return [missing if o is None else o for o in outcomes]


async def _put_again(conn: asyncpg.Connection, puts: list[Put]) -> list[tuple[bool, Any]]:
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
    users, positions, kinds, apps, ids, ats = zip(*tx.changes, strict=True)
    await tx.conn.execute(
        "INSERT INTO changes SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[],"
        " $4::text[], $5::text[], $6::timestamptz[])",
        users,
        positions,
        kinds,
        apps,
        ids,
        ats,
    )
    touched = sorted({c[0] for c in tx.changes})
    await tx.conn.execute(
        "UPDATE feed_heads SET position = t.p FROM unnest($1::text[], $2::bigint[]) AS t(u, p)"
        " WHERE feed_heads.user_id = t.u",
        touched,
        [tx.heads[u] for u in touched],
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
    await conn.execute("DELETE FROM idempotency WHERE expires <= $1", now)
    return len(expired)


# -- reads -------------------------------------------------------------------------------------


_APP_SELECT = "SELECT client_id, host_name, display_name, secret_hash, created_date_time FROM apps"
_CHANGES_SQL = (
    f"SELECT c.position, c.kind, c.app, c.notification_id, c.at, {_prefixed('n')}"
    " FROM changes c LEFT JOIN notifications n ON n.id = c.notification_id"
    " AND n.user_id = c.user_id AND c.kind IN ('created', 'updated')"
    " AND n.expiration_date_time > $1"
    " WHERE c.user_id = $2 AND c.position > $3{app_clause} ORDER BY c.position LIMIT $4"
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
