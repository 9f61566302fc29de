"""SQLite: what the sweeper removes (`Retention`)."""

from __future__ import annotations

from datetime import datetime

from herald.model import ChangeKind
from herald.store.contract import Retention
from herald.store.rows import to_micros
from herald.store.schema import SEND_SCOPE
from herald.store.sqlite.appends import remove
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase
from herald.store.sqlite.deliveries import delete_deliveries_of


class SqliteRetention(SqliteDatabase, Retention):
    async def sweep(self, now: datetime, retain_changes_until: datetime, limit: int) -> int:
        return await self._write(lambda c: _sweep(c, now, retain_changes_until, limit))

    async def prune_sends(self, finished_before: datetime, limit: int) -> int:
        return await self._write(lambda c: _prune_sends(c, to_micros(finished_before), limit))

    async def take_turn(self, name: str, now: datetime, interval: float) -> bool:
        at, since = to_micros(now), to_micros(now) - round(interval * 1_000_000)
        return await self._write(
            lambda c: (
                c.execute(
                    "INSERT INTO turns (name, at) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                    " SET at = excluded.at WHERE turns.at <= ? RETURNING name",
                    (name, at, since),
                ).fetchone()
                is not None
            )
        )


def _sweep(c: Connection, now: datetime, retain_until: datetime, limit: int) -> int:
    at = to_micros(now)
    expired = c.execute(
        "SELECT id, user_id, app FROM notifications WHERE expiration_date_time <= ?"
        " ORDER BY expiration_date_time LIMIT ?",
        (at, limit),
    ).fetchall()
    for nid, user_id, app in expired:
        remove(c, user_id, app, nid, ChangeKind.EXPIRED, at)
    # Prune whole prefixes of each log, so everything at or below `pruned` is gone.
    horizons = c.execute(
        "SELECT user_id, max(position) FROM changes WHERE at < ? GROUP BY user_id",
        (to_micros(retain_until),),
    ).fetchall()
    for user_id, position in horizons:
        c.execute(
            "INSERT INTO feed_heads (user_id, position, pruned) VALUES (?1, ?2, ?2)"
            " ON CONFLICT (user_id) DO UPDATE SET position = max(position, ?2),"
            " pruned = max(pruned, ?2)",
            (user_id, position),
        )
        c.execute("DELETE FROM changes WHERE user_id = ? AND position <= ?", (user_id, position))
    if horizons:
        # Entries whose change was pruned can no longer be announced (a device that missed them
        # is behind the horizon and must resync anyway). The outbox is normally near empty, so
        # one scan beats an index every append would pay for.
        c.execute(
            "DELETE FROM outbox WHERE NOT EXISTS (SELECT 1 FROM changes c"
            " WHERE c.user_id = outbox.user_id AND c.position = outbox.position)"
        )
    swept = c.execute(
        "DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
        " WHERE expiration_date_time <= ? ORDER BY expiration_date_time LIMIT ?) RETURNING id",
        (at, limit),
    ).fetchall()
    delete_deliveries_of(c, swept)
    c.execute("DELETE FROM idempotency WHERE expires <= ?", (at,))
    c.execute("DELETE FROM redeemed_codes WHERE expires <= ?", (at,))
    return len(expired)


def _prune_sends(c: Connection, before: int, limit: int) -> int:
    ids = [
        r[0]
        for r in c.execute(
            "SELECT id FROM sends WHERE finished < ? ORDER BY finished LIMIT ?", (before, limit)
        ).fetchall()
    ]
    keys = [(i,) for i in ids]
    c.executemany("DELETE FROM send_recipients WHERE send_id = ?", keys)
    c.executemany("DELETE FROM send_failures WHERE send_id = ?", keys)
    c.executemany(f"DELETE FROM idempotency WHERE scope = '{SEND_SCOPE}' || ?", keys)
    c.executemany("DELETE FROM sends WHERE id = ?", keys)
    return len(ids)
