"""PostgreSQL: the notifications of each feed (`Notifications`). Puts are written by `puts.py`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from herald.model import ChangeKind, Content, Notification, StatePatch
from herald.query import Filter, Page, Query
from herald.store.compiler import POSTGRES, feed_where, order_by
from herald.store.contract import Notifications, Once, Remembered
from herald.store.postgres.connection import identity, translated
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter
from herald.store.revisions import Put, matching, patched
from herald.store.rows import NOTIFICATION_COLUMNS, notification_from_row, notification_values


class PostgresNotifications(PostgresWriter, Notifications):
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
            old = matching(await _live(tx.conn, user_id, app, id, now), id, if_match)
            n = patched(old, patch, now)
            await _update_rows(tx.conn, [n])
            tx.append(user_id, ChangeKind.UPDATED, app, n.id, now, origin)
            return n

        return await self._op(user_id, run)

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
            matching(await _live(tx.conn, user_id, app, id, now), id, if_match)
            await tx.conn.execute("DELETE FROM notifications WHERE id = $1", id)
            tx.append(user_id, ChangeKind.DELETED, app, id, now, origin)

        await self._op(user_id, run)

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

        return await self._op(user_id, run)


def prefixed(alias: str) -> str:
    """The notification columns, each prefixed with `alias`."""
    return ", ".join(f"{alias}.{col.strip()}" for col in NOTIFICATION_COLUMNS.split(","))


def _from_row(row: Sequence[Any]) -> Notification:
    return notification_from_row(row, identity)


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


_ARRAYS = (
    "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::timestamptz[],"
    " $13::int[], $14::bytea[])"
)
_UPDATE_SQL = (
    f"UPDATE notifications SET ({NOTIFICATION_COLUMNS}) = ({prefixed('t')})"
    f" FROM {_ARRAYS} AS t({NOTIFICATION_COLUMNS}) WHERE notifications.id = t.id"
)


async def _update_rows(conn: asyncpg.Connection, rows: Iterable[Notification]) -> None:
    """Update the rows of these notifications, passed column-wise as arrays (one round trip)."""
    columns: list[list[object]] = [[] for _ in range(14)]
    for n in rows:
        values = notification_values(n, identity)
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    if columns[0]:
        await conn.execute(_UPDATE_SQL, *columns)
