"""SQLite: the queue of pushes, claimed and settled by the push engine (`DeliveryQueue`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from herald.model import Delivery, Provider, Settlement
from herald.store.contract import DeliveryQueue
from herald.store.rows import decode_channel, decode_message, from_micros, provider_of, to_micros
from herald.store.settlement import Claimed, settle_ids, settle_plan
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase

# Undeliverable deliveries a claim may purge beyond what it returns: bounds one claim's work when
# many are left over (say, from a deleted subscription whose deliveries were queued meanwhile).
PURGE_MAX = 10_000


class SqliteDeliveryQueue(SqliteDatabase, DeliveryQueue):
    async def claim(
        self, provider: Provider, now: datetime, lease: float, limit: int
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        at = to_micros(now)
        until = to_micros(now + timedelta(seconds=lease))
        return await self._write(lambda c: _claim(c, provider, at, until, limit))

    async def settle(self, outcomes: Sequence[Settlement], now: datetime) -> None:
        if not outcomes:
            return
        at = to_micros(now)
        await self._write(lambda c: _settle(c, outcomes, at))

    async def next_due(self, provider: Provider) -> datetime | None:
        (due,) = await self._read(
            lambda c: c.execute(
                "SELECT min(due) FROM deliveries WHERE provider = ?", (provider,)
            ).fetchone()
        )
        return None if due is None else from_micros(due)

    async def count_deliveries(self, provider: Provider | None = None) -> int:
        sql = "SELECT count(*) FROM deliveries"
        params: tuple[str, ...] = ()
        if provider is not None:
            sql, params = f"{sql} WHERE provider = ?", (provider,)
        (count,) = await self._read(lambda c: c.execute(sql, params).fetchone())
        return int(count)


def delete_deliveries_of(c: Connection, subscriptions: list[Any]) -> None:
    """Delete the deliveries of these subscriptions (rows of one column: the id)."""
    c.executemany("DELETE FROM deliveries WHERE subscription_id = ?", subscriptions)


# Due deliveries in claim order, with what decides whether they can still be sent. No LIMIT: the
# caller reads until it has enough sendable ones (purging the others on the way).
_CLAIM_SQL = (
    "SELECT d.id, d.subscription_id, d.user_id, d.app, d.message, d.expires, d.attempts,"
    " d.created, s.push_channel, s.seen_position, s.expiration_date_time, s.gone"
    " FROM deliveries d LEFT JOIN subscriptions s ON s.id = d.subscription_id"
    " WHERE d.provider = ? AND d.due <= ? ORDER BY d.due, d.id"
)


def _claim(c: Connection, provider: Provider, at: int, until: int, limit: int) -> list[Delivery]:
    claimed: list[Delivery] = []
    purge: list[tuple[int]] = []
    cursor = c.execute(_CLAIM_SQL, (provider, at))
    try:
        while len(claimed) < limit and len(purge) < PURGE_MAX:
            row = cursor.fetchone()
            if row is None:
                break
            id, sub, user_id, app, message, expires, attempts, created = row[:8]
            push_channel, seen_position, sub_expires, gone = row[8:]
            channel = None if push_channel is None else decode_channel(push_channel)
            if (
                sub_expires is None  # the subscription was deleted
                or sub_expires <= at
                or gone is not None
                or provider_of(channel) != provider
                or expires <= at
            ):
                purge.append((id,))
                continue
            assert channel is not None
            claimed.append(
                Delivery(
                    id=id,
                    subscription_id=sub,
                    user_id=user_id,
                    app=app,
                    provider=provider,
                    channel=channel,
                    message=decode_message(message),
                    attempts=attempts + 1,
                    seen_position=seen_position,
                    created=from_micros(created),
                )
            )
    finally:
        cursor.close()
    # Written once the read is done: changing rows under an open cursor is undefined in SQLite.
    c.executemany("DELETE FROM deliveries WHERE id = ?", purge)
    c.executemany(
        "UPDATE deliveries SET due = ?, attempts = attempts + 1 WHERE id = ?",
        [(until, d.id) for d in claimed],
    )
    return claimed


def _settle(c: Connection, outcomes: Sequence[Settlement], at: int) -> None:
    ids = json.dumps(settle_ids(outcomes))
    found = {
        r[0]: Claimed._make(r[1:])
        for r in c.execute(
            "SELECT d.id, d.subscription_id, d.attempts, s.channel_key FROM json_each(?) AS k"
            " JOIN deliveries d ON d.id = k.value LEFT JOIN subscriptions s"
            " ON s.id = d.subscription_id",
            (ids,),
        )
    }
    plan = settle_plan(outcomes, found)
    c.executemany(
        "UPDATE deliveries SET due = ? WHERE id = ?",
        [(to_micros(due), id) for id, due in plan.retry.items()],
    )
    c.executemany("DELETE FROM deliveries WHERE id = ?", [(id,) for id in plan.delete])
    delete_deliveries_of(c, [(sub,) for sub in plan.gone])
    c.executemany(
        "UPDATE subscriptions SET"
        " consecutive_failures = CASE WHEN ?2 THEN 0 ELSE consecutive_failures END + ?3,"
        " last_error = CASE WHEN ?3 > 0 THEN ?4 WHEN ?2 THEN NULL ELSE last_error END,"
        " last_delivered = CASE WHEN ?2 THEN ?6 ELSE last_delivered END,"
        " gone = CASE WHEN ?5 THEN ?6 ELSE gone END"
        " WHERE id = ?1",
        [(s.id, s.delivered, s.failures, s.error, s.gone, at) for s in plan.subscriptions],
    )
