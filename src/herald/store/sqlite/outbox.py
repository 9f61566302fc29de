"""SQLite: the outbox the dispatcher drains, the subscriptions it pushes to, and the queueing of
their deliveries (`Outbox`)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import UTC, datetime

from herald.model import ChangeKind, NewDelivery, Pending, Subscription
from herald.preferences import HeldPush
from herald.store.contract import Outbox
from herald.store.rows import (
    SUBSCRIPTION_COLUMNS,
    encode_message,
    from_micros,
    pending_from_row,
    subscription_from_row,
    to_micros,
)
from herald.store.sqlite.changelog import CHANGE_FIELDS, NOW_JOIN
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase
from herald.store.sqlite.preferences import insert_held


class SqliteOutbox(SqliteDatabase, Outbox):
    async def pending(
        self, limit: int, shards: Collection[int] | None = None, skip: Collection[int] = ()
    ) -> list[Pending]:
        if shards is not None:
            raise ValueError("SQLite is single-process: its one node holds every shard")
        args = (to_micros(datetime.now(UTC)), json.dumps(list(skip)), limit)
        rows = await self._read(lambda c: c.execute(_PENDING_SQL, args).fetchall())
        return [pending_from_row(r, from_micros) for r in rows]

    async def waiting(self, limit: int) -> int:
        row = await self._read(lambda c: c.execute(_WAITING_SQL, (limit,)).fetchone())
        return int(row[0])

    async def push_targets(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> list[Subscription]:
        if not pairs:
            return []
        keys = json.dumps(sorted(set(pairs)))
        rows = await self._read(
            lambda c: c.execute(_PUSH_TARGETS_SQL, (keys, to_micros(now))).fetchall()
        )
        return [subscription_from_row(r, from_micros) for r in rows]

    async def dispatched(
        self,
        seqs: Sequence[int],
        deliveries: Sequence[NewDelivery] = (),
        held: Sequence[HeldPush] = (),
    ) -> None:
        """In the write transaction (which excludes every other writer, other processes on the
        file included): see which entries are still there, remove them, supersede for those,
        and queue only the deliveries of those."""
        if not seqs:
            return  # no entry removed: no delivery may be queued
        keys = json.dumps(list(seqs))
        created = to_micros(datetime.now(UTC))
        rows = [
            (
                d.subscription_id,
                d.user_id,
                d.app,
                d.provider,
                encode_message(d.message),
                d.message.notification_id,
                d.message.position,
                to_micros(d.message.expires),
                to_micros(d.due),
                created,
            )
            for d in deliveries
        ]
        changes = [(r[1], r[6]) for r in rows]

        def job(c: Connection) -> None:
            removed = c.execute(_OUTBOX_FIND_SQL, (keys,)).fetchall()
            if not removed:
                return
            c.execute(_OUTBOX_REMOVE_SQL, (keys,))
            c.executemany(_SUPERSEDE_SQL, [r for r in removed if r[2] is not None])
            mine = {(r[0], r[1]) for r in removed}
            if mine.issuperset(changes):
                c.executemany(_DELIVERY_INSERT_SQL, rows)
            else:  # some entries were gone: queue for the rest only
                c.executemany(_DELIVERY_INSERT_SQL, [r for r in rows if (r[1], r[6]) in mine])
            if held:
                insert_held(c, held, mine)

        await self._write(job, lazy=True)


# Inner join: an entry whose change was pruned is skipped (sweep removes it).
# The last column: whether the entry's (user, app) has a push channel, not gone (an index probe
# of subscriptions_owner): the dispatcher asks `push_targets` only for those pairs.
_PUSHABLE = (
    "EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = o.user_id AND s.app = c.app"
    " AND s.push_channel IS NOT NULL AND s.gone IS NULL)"
)
_PENDING_SQL = (
    f"SELECT o.seq, o.user_id, {CHANGE_FIELDS}, {_PUSHABLE} FROM outbox o"
    f" JOIN changes c ON c.user_id = o.user_id AND c.position = o.position{NOW_JOIN}"
    " WHERE o.seq NOT IN (SELECT value FROM json_each(?)) ORDER BY o.seq LIMIT ?"
)
_WAITING_SQL = "SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT ?)"
_PUSH_TARGETS_SQL = (
    f"SELECT {', '.join('s.' + col.strip() for col in SUBSCRIPTION_COLUMNS.split(','))}"
    " FROM json_each(?1) AS k JOIN subscriptions s"
    " ON s.user_id = json_extract(k.value, '$[0]') AND s.app = json_extract(k.value, '$[1]')"
    " WHERE s.push_channel IS NOT NULL AND s.expiration_date_time > ?2 AND s.gone IS NULL"
    " ORDER BY s.user_id, s.app, s.created_date_time, s.id"
)

# The outbox entries still there of these seqs: (user_id, position) and the notification whose
# queued deliveries the change supersedes. NULL if there can be none: the change was pruned, or it
# created the notification (a new id: nothing was queued for it before). Read in the write
# transaction that then deletes them (no other writer can come between).
_OUTBOX_FIND_SQL = (
    "SELECT o.user_id, o.position, c.notification_id FROM json_each(?) AS k"
    " JOIN outbox o ON o.seq = k.value LEFT JOIN changes c ON c.user_id = o.user_id"
    f" AND c.position = o.position AND c.kind <> '{ChangeKind.CREATED.value}'"
)
_OUTBOX_REMOVE_SQL = "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))"
# For one superseding entry (user_id, position, notification_id): the queued deliveries of the
# notification with an older position, found through the user's subscriptions (see
# deliveries_subscription in 0003_push.sql).
_SUPERSEDE_SQL = (
    "DELETE FROM deliveries WHERE subscription_id IN"
    " (SELECT id FROM subscriptions WHERE user_id = ?1) AND notification_id = ?3"
    " AND position < ?2 AND user_id = ?1"
)
_DELIVERY_INSERT_SQL = (
    "INSERT INTO deliveries (subscription_id, user_id, app, provider, message, notification_id,"
    " position, expires, due, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
