"""PostgreSQL: the outbox the dispatcher drains, the subscriptions it pushes to, and the queueing
of their deliveries (`Outbox`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime

from herald.model import ChangeKind, NewDelivery, Pending, Subscription
from herald.preferences import HeldPush
from herald.store.contract import Outbox
from herald.store.postgres.changelog import CHANGE_FIELDS, NOW_JOIN
from herald.store.postgres.connection import identity
from herald.store.postgres.preferences import insert_held
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import BACKLOG, OUTBOX, TARGETS, PostgresWriter
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
            rows = await self._kept_read(OUTBOX, lambda conn: conn.fetch(_PENDING_SQL, *args))
        else:
            args += (list(shards),)
            rows = await self._kept_read(OUTBOX, lambda conn: conn.fetch(_SHARD_PENDING_SQL, *args))
        # The last column: whether the entry's (user, app) has a push target (`_PUSHABLE`).
        return [Pending(r[0], change_from_row(r[1], tuple(r)[2:-1], identity), r[-1]) for r in rows]

    async def waiting(self, limit: int) -> int:
        count = await self._kept_read(BACKLOG, lambda conn: conn.fetchval(_WAITING_SQL, limit))
        return int(count)

    async def push_targets(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> list[Subscription]:
        if not pairs:
            return []
        keys = sorted(set(pairs))
        users, apps = [k[0] for k in keys], [k[1] for k in keys]
        rows = await self._kept_read(
            TARGETS, lambda conn: conn.fetch(_PUSH_TARGETS_SQL, users, apps, now)
        )
        return [subscription_from_row(r, identity) for r in rows]

    async def dispatched(
        self,
        seqs: Sequence[int],
        deliveries: Sequence[NewDelivery] = (),
        held: Sequence[HeldPush] = (),
    ) -> None:
        """Two statements in one transaction. The first removes the entries and answers which
        ones it removed: another node removing one of them at the same time makes it wait for
        that node's commit, then skip the entry. The second, with a snapshot taken after that
        commit (so it sees the deliveries the other node queued), supersedes for the removed
        entries and queues the deliveries of those only."""
        if not seqs:
            return  # no entry removed: no delivery may be queued
        keys = list(seqs)
        created = datetime.now(UTC)
        changes = [(d.user_id, d.message.position) for d in deliveries]
        columns: list[list[object]] = [[] for _ in range(9)]
        for d in deliveries:
            m = d.message
            values = (
                d.subscription_id,
                d.user_id,
                d.app,
                d.provider.value,
                encode_message(m),
                m.notification_id,
                m.position,
                m.expires,
                d.due,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)

        async def run(tx: Tx) -> None:
            removed = await tx.conn.fetch(_OUTBOX_REMOVE_SQL, keys)
            if not removed:
                return
            mine = {(r[0], r[1]) for r in removed}
            rows = columns
            if not mine.issuperset(changes):  # some entries were gone: queue for the rest only
                keep = [i for i, change in enumerate(changes) if change in mine]
                rows = [[column[i] for i in keep] for column in columns]
            superseding = [r for r in removed if r[2] is not None]
            # Nothing to supersede or queue (no pushes, say): spare the statement.
            if superseding or rows[0]:
                await tx.conn.execute(
                    _DISPATCHED_SQL,
                    [r[0] for r in superseding],
                    [r[2] for r in superseding],
                    [r[1] for r in superseding],
                    *rows,
                    created,
                )
            if held:  # pushes held for quiet hours, even when nothing else is queued
                await insert_held(tx.conn, held, mine)

        await self._op(None, run)


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
# Removes outbox entries; answers, of those that were still there, (user_id, position) and the
# notification whose queued deliveries the change supersedes (a subquery: one primary key probe
# per entry, never a scan of the change log). NULL if there can be none: the change was pruned,
# or it created the notification (a new id: nothing was queued for it before).
_OUTBOX_REMOVE_SQL = (
    "DELETE FROM outbox o WHERE o.seq = ANY($1::bigint[]) RETURNING o.user_id, o.position,"
    " (SELECT c.notification_id FROM changes c WHERE c.user_id = o.user_id"
    f" AND c.position = o.position AND c.kind <> '{ChangeKind.CREATED.value}')"
)
# For the superseding entries ($1-$3): delete the queued deliveries of each one's notification
# with an older position, then queue the new deliveries (all of them of removed entries).
# `found`: per entry, the index probes of (subscription_id, notification_id) for the user's
# subscriptions (see deliveries_subscription in 0003_push.sql); OFFSET 0 keeps the subquery per
# entry, so it stays probes whatever the table sizes and statistics (never a scan of the queue).
# `doomed`: those rows locked in id order, as `settle` locks them.
_DISPATCHED_SQL = (
    "WITH found AS (SELECT f.id FROM unnest($1::text[], $2::text[], $3::bigint[]) AS o(u, n, p)"
    " CROSS JOIN LATERAL (SELECT d.id FROM deliveries d WHERE d.subscription_id ="
    " ANY(ARRAY(SELECT s.id FROM subscriptions s WHERE s.user_id = o.u))"
    " AND d.notification_id = o.n AND d.position < o.p AND d.user_id = o.u OFFSET 0) AS f),"
    " doomed AS (SELECT d.id FROM deliveries d WHERE d.id = ANY(ARRAY(SELECT id FROM found))"
    " ORDER BY d.id FOR UPDATE),"
    " superseded AS (DELETE FROM deliveries WHERE id = ANY(ARRAY(SELECT id FROM doomed)))"
    " INSERT INTO deliveries (subscription_id, user_id, app, provider, message, notification_id,"
    " position, expires, due, created)"
    " SELECT t.*, $13 FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[],"
    " $9::text[], $10::bigint[], $11::timestamptz[], $12::timestamptz[]) AS t"
)
