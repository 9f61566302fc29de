"""SQLite: the notifications of each feed (`Notifications`). Puts are written by `puts.py`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from herald.model import ChangeKind, Content, Notification, StatePatch
from herald.query import DEFAULT_ORDER, Filter, Page, Query
from herald.store.compiler import SQLITE, feed_where, order_by
from herald.store.contract import Notifications, Once, Remembered
from herald.store.revisions import matching, patched
from herald.store.rows import (
    NOTIFICATION_COLUMNS,
    from_micros,
    notification_from_row,
    notification_values,
    to_micros,
)
from herald.store.sqlite.appends import append, remove
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase
from herald.store.sqlite.puts import UPDATE_SQL, PutJob, find_live

INLINE_ROWS = 2000  # a list in index order reading at most this many rows runs on the loop


class SqliteNotifications(SqliteDatabase, Notifications):
    async def put(
        self,
        user_id: str,
        app: str,
        content: Content,
        new_id: str,
        now: datetime,
        origin: str | None = None,
    ) -> tuple[Notification, bool]:
        result = await self._write(PutJob(user_id, app, content, new_id, now, origin))
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
        result = await self._write(PutJob(user_id, app, content, new_id, now, origin, once))
        return cast(Remembered, result)  # a put with a key

    async def get(self, user_id: str, app: str, id: str, now: datetime) -> Notification | None:
        return await self._read(lambda c: find_live(c, user_id, app, id, to_micros(now)))

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
            n = matching(find_live(c, user_id, app, id, to_micros(now)), id, if_match)
            remove(c, n.user_id, n.app, n.id, ChangeKind.DELETED, to_micros(now), origin)

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
                remove(c, user_id, app, nid, ChangeKind.DELETED, at, origin)
            return len(ids)

        return await self._write(job)


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
    old = matching(find_live(c, user_id, app, id, to_micros(now)), id, if_match)
    n = patched(old, patch, now)
    c.execute(UPDATE_SQL, notification_values(n, to_micros))
    append(c, user_id, ChangeKind.UPDATED, app, n.id, to_micros(now), origin)
    return n
