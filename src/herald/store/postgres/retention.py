"""PostgreSQL: what the sweeper removes (`Retention`)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from herald.model import ChangeKind
from herald.store.contract import Retention
from herald.store.postgres.connection import translated
from herald.store.postgres.deliveries import DELETE_DELIVERIES_OF_S
from herald.store.postgres.transaction import Tx, append_changes, lock_heads
from herald.store.postgres.writer import PostgresWriter
from herald.store.schema import SEND_SCOPE


class PostgresRetention(PostgresWriter, Retention):
    async def sweep(self, now: datetime, retain_changes_until: datetime, limit: int) -> int:
        expired: int = await self._exclusive(
            lambda conn: _sweep(conn, now, retain_changes_until, limit)
        )
        if expired:
            self._hooks.fire()
        return expired

    async def prune_sends(self, finished_before: datetime, limit: int) -> int:
        # One statement: atomic without a transaction of ops (see take_turn).
        async with translated(), self._acquire() as conn:
            gone: int = await conn.fetchval(_PRUNE_SENDS_SQL, finished_before, limit)
        return gone

    async def take_turn(self, name: str, now: datetime, interval: float) -> bool:
        # One statement of its own (not in a batch of ops, whose other row locks it would join
        # in an order another node's batch may not share). The row lock orders concurrent
        # callers: the second sees the first's `at`.
        async with translated(), self._acquire() as conn:
            taken = await conn.fetchval(
                "INSERT INTO turns (name, at) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE"
                " SET at = excluded.at WHERE turns.at <= $2 - make_interval(secs => $3)"
                " RETURNING name",
                name,
                now,
                interval,
            )
        return taken is not None


async def _sweep(
    conn: asyncpg.Connection, now: datetime, retain_until: datetime, limit: int
) -> int:
    candidates = await conn.fetch(
        "SELECT user_id FROM notifications WHERE expiration_date_time <= $1"
        " ORDER BY expiration_date_time LIMIT $2",
        now,
        limit,
    )
    prunable = await conn.fetch(
        "SELECT user_id, max(position) FROM changes WHERE at < $1 GROUP BY user_id", retain_until
    )
    tx = Tx(conn, await lock_heads(conn, {r[0] for r in candidates} | {r[0] for r in prunable}))
    # Re-select under the locks: only users locked above may be touched.
    expired = await conn.fetch(
        "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications"
        " WHERE expiration_date_time <= $1 AND user_id = ANY($2::text[])"
        " ORDER BY expiration_date_time LIMIT $3) RETURNING id, user_id, app",
        now,
        list(tx.heads),
        limit,
    )
    for r in expired:
        tx.append(r["user_id"], ChangeKind.EXPIRED, r["app"], r["id"], now)
    await append_changes(tx)
    if prunable:
        # Prune whole prefixes of each log, so everything at or below `pruned` is gone.
        users, positions = [r[0] for r in prunable], [r[1] for r in prunable]
        await conn.execute(
            "UPDATE feed_heads SET pruned = greatest(pruned, t.p)"
            " FROM unnest($1::text[], $2::bigint[]) AS t(u, p) WHERE feed_heads.user_id = t.u",
            users,
            positions,
        )
        await conn.execute(
            "DELETE FROM changes c USING unnest($1::text[], $2::bigint[]) AS t(u, p)"
            " WHERE c.user_id = t.u AND c.position <= t.p",
            users,
            positions,
        )
        # Entries whose change was pruned can no longer be announced (a device that missed
        # them is behind the horizon and must resync anyway). The outbox is normally near
        # empty, so a scan of it beats an index every append would pay for.
        await conn.execute(
            "DELETE FROM outbox o USING unnest($1::text[], $2::bigint[]) AS t(u, p)"
            " WHERE o.user_id = t.u AND o.position <= t.p",
            users,
            positions,
        )
    await conn.execute(
        "WITH s AS (DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
        " WHERE expiration_date_time <= $1 ORDER BY expiration_date_time LIMIT $2) RETURNING id)"
        f" {DELETE_DELIVERIES_OF_S}",
        now,
        limit,
    )
    await conn.execute("DELETE FROM idempotency WHERE expires <= $1", now)
    await conn.execute("DELETE FROM redeemed_codes WHERE expires <= $1", now)
    return len(expired)


# A finished send never changes again (the runner leaves it), so deleting it with its rows in one
# statement races nothing. `sends_unfinished` does not serve `finished <`: a scan of the sends,
# one row per request, once a sweep interval.
_PRUNE_SENDS_SQL = (
    "WITH gone AS (DELETE FROM sends WHERE id IN (SELECT id FROM sends WHERE finished < $1"
    " ORDER BY finished LIMIT $2) RETURNING id),"
    " recipients AS (DELETE FROM send_recipients WHERE send_id IN (SELECT id FROM gone)),"
    " failures AS (DELETE FROM send_failures WHERE send_id IN (SELECT id FROM gone)),"
    f" records AS (DELETE FROM idempotency WHERE scope IN (SELECT '{SEND_SCOPE}' || id FROM gone))"
    " SELECT count(*) FROM gone"
)
