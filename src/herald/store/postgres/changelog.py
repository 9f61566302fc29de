"""PostgreSQL: reading each user's change log, and how far each device has read it
(`ChangeLog`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from herald.model import Change
from herald.store.contract import ChangeLog
from herald.store.postgres.connection import identity, translated
from herald.store.postgres.notifications import prefixed
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter
from herald.store.rows import CHANGE_COLUMNS, LIVE_KINDS, change_from_row


class PostgresChangeLog(PostgresWriter, ChangeLog):
    # The `seen` calls waiting for the writer (subscription id -> highest position), and the
    # write that will record them.
    _seen: dict[str, int] | None = None
    _seen_done: asyncio.Future[None] | None = None

    async def changes(self, user_id: str, app: str | None, after: int, limit: int) -> list[Change]:
        params: list[object] = [datetime.now(UTC), user_id, after, limit]
        app_clause = ""
        if app is not None:
            params.append(app)
            app_clause = " AND c.app = $5"
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(_CHANGES_SQL.format(app_clause=app_clause), *params)
        return [change_from_row(user_id, tuple(r), identity) for r in rows]

    async def horizon(self, user_id: str) -> tuple[int, int]:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT pruned, position FROM feed_heads WHERE user_id = $1", user_id
            )
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def lost(self, user_id: str, position: int) -> bool:
        if not self._voided:  # no history was ever skipped: no read
            return False
        async with translated(), self._acquire() as conn:
            found = await conn.fetchval(_LOST_SQL, user_id, position)
        return bool(found)

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(_HEADS_SQL, list(user_ids))
        found = {str(r[0]): int(r[1]) for r in rows}
        return {u: found.get(u, 0) for u in user_ids}

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

            done = self._seen_done = asyncio.ensure_future(self._op(None, run))
            done.add_done_callback(detach)  # also if it failed before it ran
        batch[subscription_id] = max(position, batch.get(subscription_id, position))
        # Shielded: one caller cancelled must not cancel the write the others wait for.
        await asyncio.shield(done)


# A change row and the notification as it is now (NULL columns once deleted or expired).
CHANGE_FIELDS = ", ".join(f"c.{col}" for col in CHANGE_COLUMNS) + ", " + prefixed("n")
NOW_JOIN = (
    " LEFT JOIN notifications n ON n.id = c.notification_id"
    f" AND n.user_id = c.user_id AND c.kind IN {LIVE_KINDS}"
    " AND n.expiration_date_time > $1"
)
_CHANGES_SQL = (
    f"SELECT {CHANGE_FIELDS} FROM changes c{NOW_JOIN}"
    " WHERE c.user_id = $2 AND c.position > $3{app_clause} ORDER BY c.position LIMIT $4"
)
_LOST_SQL = (
    "SELECT EXISTS (SELECT FROM feed_voids WHERE user_id = $1 AND after < $2 AND $2 < before)"
)
_HEADS_SQL = "SELECT user_id, position FROM feed_heads WHERE user_id = ANY($1::text[])"
# Sorted ids: rows are locked in id order, as `settle` locks them.
_SEEN_SQL = (
    "UPDATE subscriptions s SET seen_position = t.p"
    " FROM unnest($1::text[], $2::bigint[]) AS t(id, p)"
    " WHERE s.id = t.id AND s.seen_position < t.p"
)
