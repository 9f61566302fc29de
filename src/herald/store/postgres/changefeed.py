"""PostgreSQL: each app's change feed (`ChangeFeed`).

A trigger on `changes` records each appended change in `app_changes_pending`, in the change's
transaction (migrations/postgres/0009). Before a read, `_stamp` moves what has committed from
there to `app_changes`, numbering it: one stamper at a time (a transaction-scoped advisory
lock), so each stamping's seqs are above every seq committed before it. A sequence on the change
rows themselves would not do: concurrent writers commit out of sequence order, and a reader that
saw seq 11 could later miss 10. Within one stamping, rows go in the order they were appended
(`app_changes_pending.appended`): for one user that is position order, and a user's positions
commit in order, so the rows of one user that a stamping sees follow those already stamped.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import asyncpg

from herald.store.contract import ChangeFeed, FeedPage
from herald.store.postgres.changelog import CHANGE_FIELDS, NOW_JOIN
from herald.store.postgres.connection import identity, translated
from herald.store.postgres.writer import PostgresWriter
from herald.store.rows import change_from_row

# The advisory lock of the stampers of this schema (advisory locks are database-wide, and several
# Herald schemas may share a database).
STAMP_LOCK = "hashtext('herald-feed-stamp:' || current_schema())"


ENABLED_TTL = 60.0  # seconds an app's enabled feed is remembered


class PostgresChangeFeed(PostgresWriter, ChangeFeed):
    # Apps known to be enabled, and when that was checked: a read of the feed writes nothing,
    # but an app deleted (by the CLI, another process) and registered again is enabled anew.
    _feeds: dict[str, float] | None = None

    async def enable_feed(self, app: str, now: datetime) -> None:
        if self._feeds is None:
            self._feeds = {}
        if time.monotonic() - self._feeds.get(app, -ENABLED_TTL) < ENABLED_TTL:
            return
        async with translated(), self._acquire() as conn:
            await enable(conn, app, now)
        self._feeds[app] = time.monotonic()

    async def app_changes(self, app: str, after: int, limit: int) -> FeedPage:
        await self._stamp()
        async with (
            translated(),
            self._acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(_FEED_SQL, datetime.now(UTC), app, after, limit)
            # One snapshot with the rows: nothing of the app lies between them and this head.
            head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM app_changes")
        entries = [
            (int(r[0]), change_from_row(r[1], tuple(r)[3:], identity))
            for r in rows
            if r[2] is not None  # the change is still in the log
        ]
        if len(rows) == limit:
            return FeedPage(entries, int(rows[-1][0]), True)
        return FeedPage(entries, max(after, int(head)), False)

    async def feed_bounds(self) -> tuple[int, int]:
        await self._stamp()
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT pruned FROM app_changes_horizon),"
                " coalesce((SELECT max(seq) FROM app_changes), 0)"
            )
        assert row is not None
        return int(row[0]), max(int(row[0]), int(row[1]))

    async def feed_lost(self, seq: int) -> bool:
        if not self._voided:  # no history was ever skipped (epoch.py): no read
            return False
        async with translated(), self._acquire() as conn:
            found = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM app_feed_voids WHERE after < $1 AND $1 < before)", seq
            )
        return bool(found)

    async def prune_feed(self, before: datetime) -> int:
        async with translated(), self._acquire() as conn, conn.transaction():
            # The stamper's lock: a prune must not delete the newest row while a stamping
            # (which would go on from it) is under way.
            await conn.execute(f"SELECT pg_advisory_xact_lock({STAMP_LOCK})")
            keep = await conn.fetchval(
                "SELECT coalesce((SELECT seq FROM app_changes WHERE at >= $1 ORDER BY seq"
                " LIMIT 1), (SELECT max(seq) FROM app_changes))",
                before,
            )
            if keep is None:
                return 0
            gone = await conn.fetchval(
                "WITH d AS (DELETE FROM app_changes WHERE seq < $1 RETURNING 1)"
                " SELECT count(*) FROM d",
                keep,
            )
            if gone:
                await conn.execute(
                    "UPDATE app_changes_horizon SET pruned = greatest(pruned, $1)", keep - 1
                )
        return int(gone)

    async def _stamp(self) -> None:
        async with translated(), self._acquire() as conn:
            await stamp(conn)


async def enable(conn: asyncpg.Connection, app: str, now: datetime) -> None:
    """Enable the app's feed, then wait until every write to `changes` that was under way when
    it committed has ended: one may have appended a change of the app without seeing it
    enabled, and a reader must not see a later change before that one has committed. (A SHARE
    lock waits for them, as every writer holds ROW EXCLUSIVE until it ends; new writers queue
    behind it for that moment, once per app.)"""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO app_feeds (app, since) VALUES ($1, $2) ON CONFLICT DO NOTHING", app, now
        )
    async with conn.transaction():
        await conn.execute("LOCK TABLE changes IN SHARE MODE")


async def stamp(conn: asyncpg.Connection) -> None:
    """Number what has committed to the pending table, in a transaction of its own, after any
    stamping under way (so a reader sees every change that committed before it asked)."""
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({STAMP_LOCK})")
        await conn.execute(_STAMP_SQL)


# DELETE sees the rows committed before this statement; the rest wait for the next stamping.
_STAMP_SQL = (
    "WITH moved AS (DELETE FROM app_changes_pending"
    " RETURNING appended, user_id, position, app, at)"
    " INSERT INTO app_changes (app, user_id, position, at)"
    " SELECT app, user_id, position, at FROM moved ORDER BY appended"
)
_FEED_SQL = (
    f"SELECT f.seq, f.user_id, c.position, {CHANGE_FIELDS} FROM app_changes f"
    " LEFT JOIN changes c ON c.user_id = f.user_id AND c.position = f.position"
    f"{NOW_JOIN} WHERE f.app = $2 AND f.seq > $3 ORDER BY f.seq LIMIT $4"
)
