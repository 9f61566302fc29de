"""SQLite: reading each user's change log, and how far each device has read it (`ChangeLog`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from herald.model import Change
from herald.store.contract import ChangeLog
from herald.store.rows import (
    CHANGE_COLUMNS,
    LIVE_KINDS,
    NOTIFICATION_COLUMNS,
    change_from_row,
    from_micros,
    to_micros,
)
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase


class SqliteChangeLog(SqliteDatabase, ChangeLog):
    async def changes(self, user_id: str, app: str | None, after: int, limit: int) -> list[Change]:
        def job(c: Connection) -> list[Change]:
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

    async def lost(self, user_id: str, position: int) -> bool:
        return False  # one file, no replicas: Herald never finds it on another history

    def on_history(self, callback: Callable[[], None]) -> None:
        pass  # so never calls it

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        # As `horizon`: the hot path writes no head row, so the newest change counts too.
        rows = await self._read(
            lambda c: c.execute(_HEADS_SQL, (json.dumps(list(user_ids)),)).fetchall()
        )
        found = {str(r[0]): max(int(r[1] or 0), int(r[2] or 0)) for r in rows}
        return {u: found.get(u, 0) for u in user_ids}

    async def seen(self, subscription_id: str, position: int) -> None:
        def job(c: Connection) -> None:
            c.execute(
                "UPDATE subscriptions SET seen_position = ?2 WHERE id = ?1 AND seen_position < ?2",
                (subscription_id, position),
            )

        await self._write(job)


# A change row and the notification as it is now (NULL columns once deleted or expired).
CHANGE_FIELDS = ", ".join(
    [f"c.{col}" for col in CHANGE_COLUMNS]
    + [f"n.{col.strip()}" for col in NOTIFICATION_COLUMNS.split(",")]
)
NOW_JOIN = (
    " LEFT JOIN notifications n ON n.id = c.notification_id"
    f" AND n.user_id = c.user_id AND c.kind IN {LIVE_KINDS}"
    " AND n.expiration_date_time > ?"
)
_CHANGES_SQL = (
    f"SELECT {CHANGE_FIELDS} FROM changes c{NOW_JOIN}"
    " WHERE c.user_id = ? AND c.position > ?{app_clause} ORDER BY c.position LIMIT ?"
)

_HEADS_SQL = (
    "SELECT u.value, (SELECT max(position) FROM changes WHERE user_id = u.value),"
    " (SELECT position FROM feed_heads WHERE user_id = u.value) FROM json_each(?) AS u"
)
