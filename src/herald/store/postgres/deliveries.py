"""PostgreSQL: the queue of pushes, claimed and settled by the push engine (`DeliveryQueue`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from herald.model import Delivery, Provider, Settlement
from herald.store.contract import DeliveryQueue
from herald.store.postgres.connection import translated
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter
from herald.store.rows import CHANNEL_TAG, decode_channel, decode_message
from herald.store.settlement import Claimed, settle_ids, settle_plan

# Rounds of a claim that purged undeliverable rows and so returned fewer than asked for: each
# round claims again for the rest (bounded, so a claim's latency is too).
CLAIM_ROUNDS = 8
# After a CTE `s` that deleted subscriptions (RETURNING id): their deliveries go too.
DELETE_DELIVERIES_OF_S = "DELETE FROM deliveries WHERE subscription_id IN (SELECT id FROM s)"


class PostgresDeliveryQueue(PostgresWriter, DeliveryQueue):
    async def claim(
        self, provider: Provider, now: datetime, lease: float, limit: int
    ) -> list[Delivery]:
        """One statement per round, outside the writer (autocommit): it locks what it picks with
        SKIP LOCKED, so it never waits for another claim or a settle and never deadlocks."""
        until = now + timedelta(seconds=lease)
        claimed: list[Delivery] = []
        async with translated(), self._acquire() as conn:
            for _ in range(CLAIM_ROUNDS):
                if len(claimed) >= limit:
                    break
                rows = await conn.fetch(
                    _CLAIM_SQL,
                    provider.value,
                    now,
                    until,
                    limit - len(claimed),
                    CHANNEL_TAG[provider],
                    [d.id for d in claimed],  # with a lease <= 0 they would be due still
                )
                purged = 0
                for r in rows:
                    if not r["ok"]:
                        purged += 1
                        continue
                    claimed.append(
                        Delivery(
                            id=r["id"],
                            subscription_id=r["subscription_id"],
                            user_id=r["user_id"],
                            app=r["app"],
                            provider=provider,
                            channel=decode_channel(r["push_channel"]),
                            message=decode_message(r["message"]),
                            attempts=r["attempts"],
                            seen_position=r["seen_position"],
                            created=r["created"],
                        )
                    )
                if not purged:
                    break
        return claimed

    async def settle(self, outcomes: Sequence[Settlement], now: datetime) -> None:
        ids = settle_ids(outcomes)
        if not ids:
            return

        async def run(tx: Tx) -> None:
            # Lock the deliveries first, in id order; a stale or duplicate settle waits here.
            found = await tx.conn.fetch(_SETTLE_LOCK_SQL, ids)
            plan = settle_plan(outcomes, {r[0]: Claimed(r[1], r[2], r[3]) for r in found})
            if not plan.delete and not plan.retry and not plan.subscriptions:
                return
            subs = plan.subscriptions
            await tx.conn.execute(
                _SETTLE_SQL,
                list(plan.retry),
                list(plan.retry.values()),
                plan.delete,
                [s.id for s in subs],
                [s.key for s in subs],
                [s.delivered for s in subs],
                [s.failures for s in subs],
                [s.error for s in subs],
                [s.gone for s in subs],
                now,
            )

        await self._op(None, run)

    async def next_due(self, provider: Provider) -> datetime | None:
        async with translated(), self._acquire() as conn:
            due: datetime | None = await conn.fetchval(
                "SELECT min(due) FROM deliveries WHERE provider = $1", provider.value
            )
        return due

    async def count_deliveries(self, provider: Provider | None = None) -> int:
        async with translated(), self._acquire() as conn:
            if provider is None:
                count = await conn.fetchval("SELECT count(*) FROM deliveries")
            else:
                count = await conn.fetchval(
                    "SELECT count(*) FROM deliveries WHERE provider = $1", provider.value
                )
        return int(count)


# One claim round. `cand`: the first due rows of the provider that no other transaction holds
# (SKIP LOCKED), each with whether it can still be sent; the others are purged, these leased.
# Every row of `cand` comes back (ok false: purged) so the caller knows to claim again.
_CLAIM_SQL = (
    "WITH cand AS (SELECT d.id, d.due, s.push_channel, s.seen_position,"
    " coalesce(s.expiration_date_time > $2 AND s.gone IS NULL AND d.expires > $2"
    " AND (s.push_channel::json ->> 'type') = $5, false) AS ok"
    " FROM deliveries d LEFT JOIN subscriptions s ON s.id = d.subscription_id"
    " WHERE d.provider = $1 AND d.due <= $2 AND d.id <> ALL($6::bigint[])"
    " ORDER BY d.due, d.id LIMIT $4 FOR UPDATE OF d SKIP LOCKED),"
    " purged AS (DELETE FROM deliveries d USING cand WHERE d.id = cand.id AND NOT cand.ok),"
    " leased AS (UPDATE deliveries d SET due = $3, attempts = d.attempts + 1 FROM cand"
    " WHERE d.id = cand.id AND cand.ok"
    " RETURNING d.id, d.subscription_id, d.user_id, d.app, d.message, d.attempts, d.created)"
    " SELECT cand.ok, l.id, l.subscription_id, l.user_id, l.app, l.message, l.attempts,"
    " l.created, cand.push_channel, cand.seen_position"
    " FROM cand LEFT JOIN leased l ON l.id = cand.id ORDER BY cand.due, cand.id"
)
# The deliveries a settle names, locked, with their subscription's current channel key.
# (A subquery: one primary key probe per delivery, never a scan of the subscriptions.)
_SETTLE_LOCK_SQL = (
    "SELECT d.id, d.subscription_id, d.attempts,"
    " (SELECT s.channel_key FROM subscriptions s WHERE s.id = d.subscription_id)"
    " FROM deliveries d WHERE d.id = ANY($1::bigint[]) ORDER BY d.id FOR UPDATE"
)
# A settle plan (see settlement.settle_plan) in one statement; the rows each part touches are
# disjoint. A subscription is updated only if its channel key is still the one the plan saw
# (re-checked on the row as locked); only then does its GONE take its other deliveries (ARRAY():
# computed once, so both sides of the OR are index scans).
_SETTLE_SQL = (
    "WITH subs AS (UPDATE subscriptions s SET"
    " consecutive_failures = CASE WHEN t.delivered THEN 0 ELSE s.consecutive_failures END"
    " + t.failures,"
    " last_error = CASE WHEN t.failures > 0 THEN t.error WHEN t.delivered THEN NULL"
    " ELSE s.last_error END,"
    " last_delivered = CASE WHEN t.delivered THEN $10 ELSE s.last_delivered END,"
    " gone = CASE WHEN t.gone THEN $10 ELSE s.gone END"
    " FROM unnest($4::text[], $5::text[], $6::bool[], $7::int[], $8::text[], $9::bool[])"
    " AS t(id, key, delivered, failures, error, gone)"
    " WHERE s.id = t.id AND s.channel_key = t.key RETURNING s.id, t.gone),"
    " retried AS (UPDATE deliveries d SET due = t.due"
    " FROM unnest($1::bigint[], $2::timestamptz[]) AS t(id, due) WHERE d.id = t.id)"
    " DELETE FROM deliveries WHERE id = ANY($3::bigint[])"
    " OR subscription_id = ANY(ARRAY(SELECT id FROM subs WHERE gone))"
)
