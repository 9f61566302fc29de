"""PostgreSQL: devices and their push channels (`Subscriptions`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from herald.errors import NotFound, QuotaExceeded
from herald.model import Subscription
from herald.store.contract import Subscriptions
from herald.store.postgres.connection import identity, translated
from herald.store.postgres.deliveries import DELETE_DELIVERIES_OF_S
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter
from herald.store.revisions import stored_subscription
from herald.store.rows import (
    SUBSCRIPTION_COLUMNS,
    channel_key,
    encode_channel,
    subscription_from_row,
    subscription_values,
)


class PostgresSubscriptions(PostgresWriter, Subscriptions):
    # Writes lock the user's feed head (Op(user_id)): that serialises one user's subscription
    # writes across writers and nodes, so the quota count cannot race.
    async def add_subscription(
        self, sub: Subscription, limit: int, now: datetime
    ) -> tuple[Subscription, bool]:
        async def run(tx: Tx) -> tuple[Subscription, bool]:
            return await _add_subscription(tx.conn, sub, limit, now)

        return await self._op(sub.user_id, run)

    async def get_subscription(self, id: str, now: datetime) -> Subscription | None:
        async with translated(), self._acquire() as conn:
            return await _live_subscription(conn, id, now)

    async def live_subscriptions(self, ids: Sequence[str], now: datetime) -> set[str]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT id FROM subscriptions WHERE id = ANY($1::text[])"
                " AND expiration_date_time > $2",
                list(ids),
                now,
            )
        return {r[0] for r in rows}

    async def subscription_removals(self) -> int:
        async with translated(), self._acquire() as conn:
            return int(await conn.fetchval("SELECT n FROM subscription_removals"))

    async def channel_holder(self, app: str, key: str) -> Subscription | None:
        async with translated(), self._acquire() as conn:
            return await _channel_holder(conn, app, key)

    async def list_subscriptions(self, user_id: str, app: str, now: datetime) -> list[Subscription]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = $1"
                " AND app = $2 AND expiration_date_time > $3 ORDER BY created_date_time, id",
                user_id,
                app,
                now,
            )
        return [subscription_from_row(r, identity) for r in rows]

    async def update_subscription(self, sub: Subscription, now: datetime) -> Subscription:
        async def run(tx: Tx) -> Subscription:
            return await _update_subscription(tx.conn, sub, now)

        return await self._op(sub.user_id, run)

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

        await self._op(None, run)


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
            f" {DELETE_DELIVERIES_OF_S}",
            holder.id,
        )
    stored = stored_subscription(sub)
    await conn.execute(_SUBSCRIPTION_INSERT_SQL, *subscription_values(stored, identity))
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
            f" AND id <> $3 RETURNING id) {DELETE_DELIVERIES_OF_S}",
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
    return None if row is None else subscription_from_row(row, identity)


async def _live_subscription(
    conn: asyncpg.Connection, id: str, now: datetime
) -> Subscription | None:
    row = await conn.fetchrow(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
        " WHERE id = $1 AND expiration_date_time > $2",
        id,
        now,
    )
    return None if row is None else subscription_from_row(row, identity)


def _subscription_update(s: Subscription) -> tuple[object, ...]:
    return (
        s.id,
        s.platform,
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
