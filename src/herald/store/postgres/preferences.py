"""PostgreSQL: notification preferences and the pushes held during quiet hours
(`Preferences`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg

from herald.errors import PreconditionFailed
from herald.model import NewDelivery, ReadState, Subscription, UserActionState
from herald.preferences import (
    HeldSummary,
    NotificationPreferences,
    StoredPreferences,
    decode,
    encode,
    summaries,
)
from herald.store.contract import Preferences
from herald.store.postgres.connection import identity, translated
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import TARGETS, PostgresWriter
from herald.store.rows import SUBSCRIPTION_COLUMNS, encode_message, subscription_from_row


class PostgresPreferences(PostgresWriter, Preferences):
    async def get_preferences(self, user_id: str, app: str) -> StoredPreferences | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(_GET_SQL, user_id, app)
        return None if row is None else _stored(row)

    async def put_preferences(
        self,
        user_id: str,
        app: str,
        preferences: NotificationPreferences,
        if_match: int | None,
        now: datetime,
        release: datetime | None = None,
    ) -> StoredPreferences:
        doc = encode(preferences)

        # An op's error does not roll its transaction back: check before writing. The row lock
        # (FOR UPDATE) orders concurrent writers of one user's preferences.
        async def run(tx: Tx) -> StoredPreferences:
            current = await tx.conn.fetchval(
                "SELECT version FROM notification_preferences WHERE user_id = $1 AND app = $2"
                " FOR UPDATE",
                user_id,
                app,
            )
            if if_match is not None and if_match != (current or 0):
                raise PreconditionFailed("The preferences were changed since (ETag mismatch).")
            row = await tx.conn.fetchrow(
                "INSERT INTO notification_preferences VALUES ($1, $2, $3, 1, $4)"
                " ON CONFLICT (user_id, app) DO UPDATE SET preferences = excluded.preferences,"
                " version = notification_preferences.version + 1,"
                " last_modified = excluded.last_modified"
                " RETURNING preferences, version, last_modified",
                user_id,
                app,
                doc,
                now,
            )
            if release is not None:
                await tx.conn.execute(
                    "UPDATE held_pushes SET release_at = $3 WHERE user_id = $1 AND app = $2",
                    user_id,
                    app,
                    release,
                )
            return _stored(row)

        return await self._op(None, run)

    async def push_audience(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> tuple[list[Subscription], dict[tuple[str, str], NotificationPreferences]]:
        if not pairs:
            return [], {}
        keys = sorted(set(pairs))
        users, apps = [k[0] for k in keys], [k[1] for k in keys]
        # On the dispatcher's kept connection for push targets, as `Outbox.push_targets`.
        rows = await self._kept(TARGETS, lambda conn: conn.fetch(_AUDIENCE_SQL, users, apps, now))
        subs = [subscription_from_row(r, identity) for r in rows]
        prefs = {}
        for sub, row in zip(subs, rows, strict=True):
            if row[-1] is not None and (sub.user_id, sub.app) not in prefs:
                prefs[sub.user_id, sub.app] = decode(row[-1])
        return subs, prefs

    async def release_held(
        self, now: datetime, limit: int, summary: Callable[[HeldSummary], NewDelivery]
    ) -> list[NewDelivery]:
        async def run(tx: Tx) -> list[NewDelivery]:
            return await _release(tx.conn, now, limit, summary)

        return await self._op(None, run)

    async def count_held(self, user_id: str, app: str) -> int:
        async with translated(), self._acquire() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM held_pushes WHERE user_id = $1 AND app = $2", user_id, app
            )
        return int(count)


async def _release(
    conn: asyncpg.Connection,
    now: datetime,
    limit: int,
    summary: Callable[[HeldSummary], NewDelivery],
) -> list[NewDelivery]:
    # DELETE ... RETURNING: of two nodes releasing at once, each row goes to one of them (the
    # other waits for its commit, then finds it gone).
    held = await conn.fetch(
        "DELETE FROM held_pushes WHERE release_at <= $1 AND subscription_id = ANY(ARRAY("
        "SELECT subscription_id FROM held_pushes WHERE release_at <= $1"
        " GROUP BY subscription_id ORDER BY min(release_at) LIMIT $2))"
        " RETURNING subscription_id, user_id, app, provider, notification_id, position, expires",
        now,
        limit,
    )
    if not held:
        return []
    live = {
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM notifications WHERE id = ANY($1::text[])"
            " AND expiration_date_time > $2 AND read_state = $3"
            " AND user_action_state <> ALL($4::text[])",
            sorted({r[4] for r in held}),
            now,
            ReadState.UNREAD.value,
            [UserActionState.DISMISSED.value, UserActionState.ACTIVATED.value],
        )
    }
    reachable = {
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM subscriptions WHERE id = ANY($1::text[])"
            " AND push_channel IS NOT NULL AND expiration_date_time > $2 AND gone IS NULL",
            sorted({r[0] for r in held}),
            now,
        )
    }
    queued = [summary(s) for s in summaries([tuple(r) for r in held], live, reachable)]
    if queued:
        await conn.execute(
            "INSERT INTO deliveries (subscription_id, user_id, app, provider, message,"
            " notification_id, position, expires, due, created) SELECT *, $10 FROM"
            " unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
            " $7::bigint[], $8::timestamptz[], $9::timestamptz[])",
            [d.subscription_id for d in queued],
            [d.user_id for d in queued],
            [d.app for d in queued],
            [d.provider.value for d in queued],
            [encode_message(d.message) for d in queued],
            [d.message.notification_id for d in queued],
            [d.message.position for d in queued],
            [d.message.expires for d in queued],
            [d.due for d in queued],
            datetime.now(UTC),
        )
    return queued


def _stored(row: Sequence[object]) -> StoredPreferences:
    at = row[2]
    assert isinstance(at, datetime)
    return StoredPreferences(
        preferences=decode(str(row[0])),
        version=int(str(row[1])),
        last_modified_date_time=at,
    )


_GET_SQL = (
    "SELECT preferences, version, last_modified FROM notification_preferences"
    " WHERE user_id = $1 AND app = $2"
)
_AUDIENCE_SQL = (
    f"SELECT {', '.join('s.' + col.strip() for col in SUBSCRIPTION_COLUMNS.split(','))},"
    " p.preferences FROM subscriptions s JOIN unnest($1::text[], $2::text[]) AS k(u, a)"
    " ON s.user_id = k.u AND s.app = k.a"
    " LEFT JOIN notification_preferences p ON p.user_id = s.user_id AND p.app = s.app"
    " WHERE s.push_channel IS NOT NULL AND s.expiration_date_time > $3 AND s.gone IS NULL"
    " ORDER BY s.user_id, s.app, s.created_date_time, s.id"
)
