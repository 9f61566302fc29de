"""PostgreSQL: the outbox the dispatcher drains, the subscriptions it pushes to, and the queueing
of their deliveries (`Outbox`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime

import msgspec

from herald.model import NewDelivery, Pending, Subscription
from herald.preferences import HeldPush
from herald.store.contract import Outbox
from herald.store.postgres.changelog import CHANGE_FIELDS, NOW_JOIN
from herald.store.postgres.connection import identity
from herald.store.postgres.writer import BACKLOG, OUTBOX, REMOVALS, TARGETS, PostgresWriter
from herald.store.rows import (
    SUBSCRIPTION_COLUMNS,
    change_from_row,
    encode_message,
    subscription_from_row,
)


class PostgresOutbox(PostgresWriter, Outbox):
    async def pending(
        self, limit: int, shards: Collection[int] | None = None, skip: Collection[int] = ()
    ) -> list[Pending]:
        args: tuple[object, ...] = (datetime.now(UTC), limit, list(skip))
        if shards is None:
            rows = await self._kept(OUTBOX, lambda conn: conn.fetch(_PENDING_SQL, *args))
        else:
            args += (list(shards),)
            rows = await self._kept(OUTBOX, lambda conn: conn.fetch(_SHARD_PENDING_SQL, *args))
        # The last column: whether the entry's (user, app) has a push target (`_PUSHABLE`).
        return [Pending(r[0], change_from_row(r[1], tuple(r)[2:-1], identity), r[-1]) for r in rows]

    async def waiting(self, limit: int) -> int:
        count = await self._kept(BACKLOG, lambda conn: conn.fetchval(_WAITING_SQL, limit))
        return int(count)

    async def push_targets(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> list[Subscription]:
        if not pairs:
            return []
        keys = sorted(set(pairs))
        users, apps = [k[0] for k in keys], [k[1] for k in keys]
        rows = await self._kept(
            TARGETS, lambda conn: conn.fetch(_PUSH_TARGETS_SQL, users, apps, now)
        )
        return [subscription_from_row(r, identity) for r in rows]

    async def dispatched(
        self,
        seqs: Sequence[int],
        deliveries: Sequence[NewDelivery] = (),
        held: Sequence[HeldPush] = (),
    ) -> None:
        """One call of `herald_dispatched` (functions/herald_dispatched.sql, which says how it
        keeps pushes queued once against another node removing the same entries), outside an
        explicit transaction and on a connection of its own: one round trip, and never behind
        the writers (an ops transaction waiting on a row lock held the removals, and after
        `MAX_REMOVALS` of them the dispatcher's live delivery, up to the idle limit)."""
        if not seqs:
            return  # no entry removed: no delivery may be queued
        queued = _columns(
            [
                (
                    d.subscription_id,
                    d.user_id,
                    d.app,
                    d.provider.value,
                    encode_message(d.message),
                    d.message.notification_id,
                    d.message.position,
                    d.message.expires,
                    d.due,
                )
                for d in deliveries
            ],
            9,
        )
        # HeldPush's fields are the function's held-push arguments, in order.
        kept = _columns([msgspec.structs.astuple(h) for h in held], 8)
        args = (list(seqs), *queued, datetime.now(UTC), *kept)
        await self._kept(REMOVALS, lambda conn: conn.execute(_DISPATCHED_SQL, *args))


def _columns(rows: list[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as the parallel arrays a function takes, one per column."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


# Whether an entry's (user, app) has a subscription with a push channel, not gone (an index
# probe of subscriptions_owner): the dispatcher asks `push_targets` only for those pairs, which
# also leaves out the expired ones by the dispatcher's clock.
_PUSHABLE = (
    "EXISTS (SELECT FROM subscriptions s WHERE s.user_id = o.user_id AND s.app = c.app"
    " AND s.push_channel IS NOT NULL AND s.gone IS NULL)"
)
# Inner join: an entry whose change was pruned is skipped (sweep removes it). The entries in
# $3 are filtered out on the outbox scan, before their joins.
_PENDING_SQL = (
    f"SELECT o.seq, o.user_id, {CHANGE_FIELDS}, {_PUSHABLE} FROM outbox o"
    f" JOIN changes c ON c.user_id = o.user_id AND c.position = o.position{NOW_JOIN}"
    " WHERE o.seq <> ALL($3::bigint[]) ORDER BY o.seq LIMIT $2"
)
_SHARD_PENDING_SQL = (
    f"SELECT o.seq, o.user_id, {CHANGE_FIELDS}, {_PUSHABLE} FROM outbox o"
    f" JOIN changes c ON c.user_id = o.user_id AND c.position = o.position{NOW_JOIN}"
    " WHERE o.shard = ANY($4::smallint[]) AND o.seq <> ALL($3::bigint[])"
    " ORDER BY o.seq LIMIT $2"
)
# The dispatcher's way through the outbox (its primary key), without the joins.
_WAITING_SQL = "SELECT count(*) FROM (SELECT FROM outbox ORDER BY seq LIMIT $1) AS o"
_PUSH_TARGETS_SQL = (
    f"SELECT {', '.join('s.' + col.strip() for col in SUBSCRIPTION_COLUMNS.split(','))}"
    " FROM subscriptions s JOIN unnest($1::text[], $2::text[]) AS k(u, a)"
    " ON s.user_id = k.u AND s.app = k.a"
    " WHERE s.push_channel IS NOT NULL AND s.expiration_date_time > $3 AND s.gone IS NULL"
    " ORDER BY s.user_id, s.app, s.created_date_time, s.id"
)
_DISPATCHED_SQL = (
    "SELECT herald_dispatched($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::text[], $7::text[], $8::bigint[], $9::timestamptz[], $10::timestamptz[],"
    " $11::timestamptz, $12::text[], $13::text[], $14::text[], $15::text[], $16::text[],"
    " $17::bigint[], $18::timestamptz[], $19::timestamptz[])"
)
