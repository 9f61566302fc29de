"""SQLite: each app's change feed (`ChangeFeed`). A trigger on `changes` adds the feed's row in
the change's transaction (migrations/sqlite/0008); the single writer commits in rowid order, so
seq order is commit order."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from herald.store.contract import ChangeFeed, FeedPage
from herald.store.rows import change_from_row, from_micros, to_micros
from herald.store.sqlite.changelog import CHANGE_FIELDS, NOW_JOIN
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase

ENABLED_TTL = 60.0  # seconds an app's enabled feed is remembered


class SqliteChangeFeed(SqliteDatabase, ChangeFeed):
    # Apps known to be enabled, and when that was checked: a read of the feed writes nothing,
    # but an app deleted (by the CLI, another process) and registered again is enabled anew.
    _feeds: dict[str, float] | None = None

    async def enable_feed(self, app: str, now: datetime) -> None:
        if self._feeds is None:
            self._feeds = {}
        if time.monotonic() - self._feeds.get(app, -ENABLED_TTL) < ENABLED_TTL:
            return
        await self._write(lambda c: enable(c, app, to_micros(now)))
        self._feeds[app] = time.monotonic()

    async def app_changes(self, app: str, after: int, limit: int) -> FeedPage:
        def job(c: Connection) -> FeedPage:
            now = to_micros(datetime.now(UTC))
            rows = c.execute(_FEED_SQL, (now, app, after, limit)).fetchall()
            entries = [
                (int(r[0]), change_from_row(r[1], r[3:], from_micros))
                for r in rows
                if r[2] is not None  # the change is still in the log
            ]
            if len(rows) == limit:
                return FeedPage(entries, int(rows[-1][0]), True)
            # The same read transaction: nothing of the app lies between the rows and the head.
            (head,) = c.execute("SELECT coalesce(max(seq), 0) FROM app_changes").fetchone()
            return FeedPage(entries, max(after, int(head)), False)

        return await self._read(job)

    async def feed_bounds(self) -> tuple[int, int]:
        row = await self._read(
            lambda c: c.execute(
                "SELECT (SELECT pruned FROM app_changes_horizon),"
                " coalesce((SELECT max(seq) FROM app_changes), 0)"
            ).fetchone()
        )
        return int(row[0]), max(int(row[0]), int(row[1]))

    async def feed_lost(self, seq: int) -> bool:
        return False  # as `ChangeLog.lost`: SQLite never finds itself on another history

    async def prune_feed(self, before: datetime) -> int:
        return await self._write(lambda c: _prune(c, to_micros(before)))


def enable(c: Connection, app: str, at: int) -> None:
    """Record the app's changes from this write on (the single writer: no change is under way)."""
    c.execute("INSERT INTO app_feeds (app, since) VALUES (?, ?) ON CONFLICT DO NOTHING", (app, at))


def _prune(c: Connection, before: int) -> int:
    # Walks the oldest rows up to the first young one: as many as it then deletes.
    first_young = c.execute(
        "SELECT seq FROM app_changes WHERE at >= ? ORDER BY seq LIMIT 1", (before,)
    ).fetchone()
    last = c.execute("SELECT max(seq) FROM app_changes").fetchone()[0]
    if last is None:
        return 0
    keep = int(first_young[0]) if first_young is not None else int(last)
    gone = c.execute("DELETE FROM app_changes WHERE seq < ?", (keep,)).rowcount
    if gone:
        c.execute("UPDATE app_changes_horizon SET pruned = max(pruned, ?)", (keep - 1,))
    return int(gone)


# The feed row, its change (NULL columns once pruned) and the notification as it is now.
_FEED_SQL = (
    f"SELECT f.seq, f.user_id, c.position, {CHANGE_FIELDS} FROM app_changes f"
    " LEFT JOIN changes c ON c.user_id = f.user_id AND c.position = f.position"
    f"{NOW_JOIN} WHERE f.app = ? AND f.seq > ? ORDER BY f.seq LIMIT ?"
)
