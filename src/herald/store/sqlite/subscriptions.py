"""SQLite: devices and their push channels (`Subscriptions`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from herald.errors import NotFound, QuotaExceeded
from herald.model import Subscription
from herald.store.contract import Subscriptions
from herald.store.revisions import stored_subscription
from herald.store.rows import (
    SUBSCRIPTION_COLUMNS,
    channel_key,
    from_micros,
    subscription_from_row,
    subscription_values,
    to_micros,
)
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase
from herald.store.sqlite.deliveries import delete_deliveries_of


class SqliteSubscriptions(SqliteDatabase, Subscriptions):
    async def add_subscription(
        self, sub: Subscription, limit: int, now: datetime
    ) -> tuple[Subscription, bool]:
        return await self._write(lambda c: _add_subscription(c, sub, limit, to_micros(now)))

    async def get_subscription(self, id: str, now: datetime) -> Subscription | None:
        return await self._read(lambda c: _live_subscription(c, id, to_micros(now)))

    async def live_subscriptions(self, ids: Sequence[str], now: datetime) -> set[str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT s.id FROM json_each(?) AS k JOIN subscriptions s ON s.id = k.value"
                " WHERE s.expiration_date_time > ?",
                (json.dumps(list(ids)), to_micros(now)),
            ).fetchall()
        )
        return {r[0] for r in rows}

    async def subscription_removals(self) -> int:
        row = await self._read(
            lambda c: c.execute("SELECT n FROM subscription_removals").fetchone()
        )
        return int(row[0])

    async def channel_holder(self, app: str, key: str) -> Subscription | None:
        return await self._read(lambda c: _channel_holder(c, app, key))

    async def list_subscriptions(self, user_id: str, app: str, now: datetime) -> list[Subscription]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = ? AND app = ?"
                " AND expiration_date_time > ? ORDER BY created_date_time, id",
                (user_id, app, to_micros(now)),
            ).fetchall()
        )
        return [subscription_from_row(r, from_micros) for r in rows]

    async def update_subscription(self, sub: Subscription, now: datetime) -> Subscription:
        return await self._write(lambda c: _update_subscription(c, sub, to_micros(now)))

    async def delete_subscription(self, user_id: str, app: str, id: str) -> None:
        # The protocol passes no `now`: liveness is judged by the clock, as `changes` does.
        at = to_micros(datetime.now(UTC))

        def job(c: Connection) -> None:
            deleted = c.execute(
                "DELETE FROM subscriptions WHERE id = ? AND user_id = ? AND app = ?"
                " AND expiration_date_time > ?",
                (id, user_id, app, at),
            ).rowcount
            if not deleted:
                raise NotFound(f"subscription {id} not found")
            c.execute("DELETE FROM deliveries WHERE subscription_id = ?", (id,))

        await self._write(job)


def _add_subscription(
    c: Connection, sub: Subscription, limit: int, at: int
) -> tuple[Subscription, bool]:
    key = channel_key(sub)
    holder = None if key is None else _channel_holder(c, sub.app, key)
    if (
        holder is not None
        and holder.user_id == sub.user_id
        and to_micros(holder.expiration_date_time) > at
    ):
        stored = stored_subscription(sub, holder)  # the same device again: update it in place
        c.execute(_SUBSCRIPTION_UPDATE_SQL, (*subscription_values(stored, to_micros), True))
        return stored, False
    # Checked before any write, so a refused call leaves nothing to roll back.
    (live,) = c.execute(
        "SELECT count(*) FROM subscriptions WHERE user_id = ? AND app = ?"
        " AND expiration_date_time > ?",
        (sub.user_id, sub.app, at),
    ).fetchone()
    if live >= limit:
        raise QuotaExceeded(f"at most {limit} subscriptions per user and app")
    if holder is not None:  # another user's, or expired: the channel now belongs to `sub`
        c.execute("DELETE FROM subscriptions WHERE id = ?", (holder.id,))
        delete_deliveries_of(c, [(holder.id,)])
    stored = stored_subscription(sub)
    c.execute(_SUBSCRIPTION_INSERT_SQL, subscription_values(stored, to_micros))
    return stored, True


def _update_subscription(c: Connection, sub: Subscription, at: int) -> Subscription:
    old = _live_subscription(c, sub.id, at)
    if old is None or (old.user_id, old.app) != (sub.user_id, sub.app):
        raise NotFound(f"subscription {sub.id} not found")
    key = channel_key(sub)
    if key is not None:
        released = c.execute(
            "DELETE FROM subscriptions WHERE app = ? AND channel_key = ? AND id <> ? RETURNING id",
            (sub.app, key, sub.id),
        ).fetchall()
        delete_deliveries_of(c, released)
    # A new channel starts with a fresh delivery state; the same one keeps its history.
    reset = key != channel_key(old)
    stored = stored_subscription(sub, old, reset)
    c.execute(_SUBSCRIPTION_UPDATE_SQL, (*subscription_values(stored, to_micros), reset))
    return stored


def _channel_holder(c: Connection, app: str, key: str) -> Subscription | None:
    """The subscription holding a push channel of the app, expired or not."""
    row = c.execute(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE app = ? AND channel_key = ?",
        (app, key),
    ).fetchone()
    return None if row is None else subscription_from_row(row, from_micros)


def _live_subscription(c: Connection, id: str, at: int) -> Subscription | None:
    row = c.execute(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
        " WHERE id = ? AND expiration_date_time > ?",
        (id, at),
    ).fetchone()
    return None if row is None else subscription_from_row(row, from_micros)


_SUBSCRIPTION_INSERT_SQL = (
    "INSERT INTO subscriptions (id, user_id, app, platform, display_name, push_channel,"
    " channel_key, expiration_date_time, created_date_time, last_modified_date_time)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The insert's parameters and then `reset` (a fresh DeliveryState); owner, app, creation time and
# seen position are not changed.
_SUBSCRIPTION_UPDATE_SQL = (
    "UPDATE subscriptions SET (platform, display_name, push_channel, channel_key,"
    " expiration_date_time, last_modified_date_time) = (?4, ?5, ?6, ?7, ?8, ?10),"
    " last_delivered = CASE WHEN ?11 THEN NULL ELSE last_delivered END,"
    " consecutive_failures = CASE WHEN ?11 THEN 0 ELSE consecutive_failures END,"
    " last_error = CASE WHEN ?11 THEN NULL ELSE last_error END,"
    " gone = CASE WHEN ?11 THEN NULL ELSE gone END"
    " WHERE id = ?1"
)
