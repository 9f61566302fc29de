"""PostgreSQL: audiences and sends to many users (`Audiences`).

Each call is one short transaction on a pooled connection of its own, not a writer batch: none
touches a feed (the notifications of a send go through `put_once`, the writers' path). Calls that
change an audience's members lock its row first, so its size limit holds across nodes."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import asyncpg

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.store.contract import Audience, Audiences, Failure, Send
from herald.store.postgres.connection import translated
from herald.store.postgres.writer import PostgresWriter

_AUDIENCE_SQL = (
    "SELECT a.app, a.id, a.display_name, a.created, (SELECT count(*) FROM audience_members m"
    " WHERE m.app = a.app AND m.audience = a.id) FROM audiences a"
)
_SEND_COLUMNS = (
    "id, app, idempotency_key, fingerprint, audience, content, total, done, failed, status,"
    " created, last_action, finished"
)


class PostgresAudiences(PostgresWriter, Audiences):
    async def put_audience(
        self, app: str, id: str, display_name: str | None, limit: int, now: datetime
    ) -> Audience:
        async with translated(), self._acquire() as conn, conn.transaction():
            # Serialises creations per app, so the limit holds across nodes.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))", app)
            count = await conn.fetchval("SELECT count(*) FROM audiences WHERE app = $1", app)
            added = await conn.fetchval(
                "INSERT INTO audiences VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING id",
                app,
                id,
                display_name,
                now,
            )
            if added is None:
                raise Conflict(f"The audience '{id}' already exists.")
            if count >= limit:
                raise QuotaExceeded(f"An app may have at most {limit} audiences.")
        return Audience(app, id, display_name, now, 0)

    async def get_audience(self, app: str, id: str) -> Audience | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(f"{_AUDIENCE_SQL} WHERE a.app = $1 AND a.id = $2", app, id)
        return None if row is None else Audience(*row)

    async def list_audiences(self, app: str) -> list[Audience]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(f"{_AUDIENCE_SQL} WHERE a.app = $1 ORDER BY a.id", app)
        return [Audience(*r) for r in rows]

    async def delete_audience(self, app: str, id: str) -> bool:
        async with translated(), self._acquire() as conn, conn.transaction():
            gone = await conn.fetchval(
                "DELETE FROM audiences WHERE app = $1 AND id = $2 RETURNING id", app, id
            )
            await conn.execute(
                "DELETE FROM audience_members WHERE app = $1 AND audience = $2", app, id
            )
        return gone is not None

    async def add_members(self, app: str, id: str, users: Sequence[str], limit: int) -> int:
        async with translated(), self._acquire() as conn, conn.transaction():
            count = await _lock(conn, app, id)
            added = await conn.fetchval(
                "WITH a AS (INSERT INTO audience_members SELECT $1, $2, u FROM unnest($3::text[]) u"
                " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM a",
                app,
                id,
                list(users),
            )
            if count + added > limit:  # rolls the transaction back
                raise QuotaExceeded(f"An audience may have at most {limit} members.")
        return int(added)

    async def remove_members(self, app: str, id: str, users: Sequence[str]) -> int:
        async with translated(), self._acquire() as conn, conn.transaction():
            await _lock(conn, app, id)
            removed = await conn.fetchval(
                "WITH d AS (DELETE FROM audience_members WHERE app = $1 AND audience = $2"
                " AND user_id = ANY($3::text[]) RETURNING 1) SELECT count(*) FROM d",
                app,
                id,
                list(users),
            )
        return int(removed)

    async def members(self, app: str, id: str, after: str | None, limit: int) -> list[str]:
        async with translated(), self._acquire() as conn:
            if (
                await conn.fetchval("SELECT 1 FROM audiences WHERE app = $1 AND id = $2", app, id)
                is None
            ):
                raise NotFound(f"The audience '{id}' was not found.")
            rows = await conn.fetch(
                "SELECT user_id FROM audience_members WHERE app = $1 AND audience = $2"
                ' AND user_id > $3 ORDER BY user_id COLLATE "C" LIMIT $4',
                app,
                id,
                after or "",
                limit,
            )
        return [r[0] for r in rows]

    async def start_send(
        self, send: Send, recipients: Sequence[str] | None, limit: int
    ) -> tuple[Send, bool]:
        async with translated(), self._acquire() as conn, conn.transaction():
            total = len(recipients) if recipients is not None else 0
            if recipients is None:
                assert send.audience is not None
                total = await _lock(conn, send.app, send.audience)
                if total > limit:
                    raise QuotaExceeded(f"A send may reach at most {limit} users.")
            stored = replace(send, total=total)
            added = await conn.fetchval(
                f"INSERT INTO sends ({_SEND_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,"
                " $10, $11, $12, $13) ON CONFLICT (app, idempotency_key) DO NOTHING RETURNING id",
                *_send_values(stored),
            )
            if added is None:  # another request (node) stored a send with this key first
                row = await conn.fetchrow(
                    f"SELECT {_SEND_COLUMNS} FROM sends WHERE app = $1 AND idempotency_key = $2",
                    send.app,
                    send.idempotency_key,
                )
                return _send(row), False
            if recipients is None:
                await conn.execute(
                    "INSERT INTO send_recipients SELECT $1, row_number() OVER"
                    ' (ORDER BY user_id COLLATE "C") - 1, user_id FROM audience_members'
                    " WHERE app = $2 AND audience = $3",
                    send.id,
                    send.app,
                    send.audience,
                )
            else:
                await conn.execute(
                    "INSERT INTO send_recipients SELECT $1, i - 1, u"
                    " FROM unnest($2::text[]) WITH ORDINALITY AS t(u, i)",
                    send.id,
                    list(recipients),
                )
        return stored, True

    async def get_send(self, app: str, id: str) -> Send | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_SEND_COLUMNS} FROM sends WHERE app = $1 AND id = $2", app, id
            )
        return None if row is None else _send(row)

    async def send_failures(self, app: str, id: str, limit: int) -> list[Failure]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT f.user_id, f.code, f.message FROM send_failures f JOIN sends s"
                " ON s.id = f.send_id WHERE s.app = $1 AND s.id = $2"
                ' ORDER BY f.user_id COLLATE "C" LIMIT $3',
                app,
                id,
                limit,
            )
        return [Failure(*r) for r in rows]

    async def unfinished_sends(
        self, limit: int, shards: Collection[int] | None = None
    ) -> list[Send]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_SEND_COLUMNS} FROM sends WHERE finished IS NULL AND ($2::int[] IS NULL"
                " OR (hashtextextended(id, 0) & 63)::int = ANY($2::int[]))"
                " ORDER BY created LIMIT $1",
                limit,
                None if shards is None else sorted(shards),
            )
        return [_send(r) for r in rows]

    async def send_recipients(self, id: str, offset: int, limit: int) -> list[str]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT user_id FROM send_recipients WHERE send_id = $1 AND seq >= $2"
                " ORDER BY seq LIMIT $3",
                id,
                offset,
                limit,
            )
        return [r[0] for r in rows]

    async def send_progress(
        self, id: str, done: int, failures: Sequence[Failure], status: str, now: datetime
    ) -> None:
        final = status in ("succeeded", "failed")
        async with translated(), self._acquire() as conn, conn.transaction():
            added = await conn.fetchval(
                "WITH f AS (INSERT INTO send_failures SELECT $1, u, c, m"
                " FROM unnest($2::text[], $3::text[], $4::text[]) AS t(u, c, m)"
                " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM f",
                id,
                [f.user_id for f in failures],
                [f.code for f in failures],
                [f.message for f in failures],
            )
            await conn.execute(
                "UPDATE sends SET done = greatest(done, $2), failed = failed + $3, status = $4,"
                " last_action = $5, finished = $6 WHERE id = $1",
                id,
                done,
                added,
                status,
                now,
                now if final else None,
            )


async def _lock(conn: asyncpg.Connection, app: str, id: str) -> int:
    """Lock the audience's row; its member count. `NotFound` if there is no such audience."""
    if (
        await conn.fetchval(
            "SELECT 1 FROM audiences WHERE app = $1 AND id = $2 FOR UPDATE", app, id
        )
        is None
    ):
        raise NotFound(f"The audience '{id}' was not found.")
    count = await conn.fetchval(
        "SELECT count(*) FROM audience_members WHERE app = $1 AND audience = $2", app, id
    )
    return int(count)


def _send_values(s: Send) -> tuple[object, ...]:
    return (
        s.id,
        s.app,
        s.idempotency_key,
        s.fingerprint,
        s.audience,
        s.content,
        s.total,
        s.done,
        s.failed,
        s.status,
        s.created,
        s.last_action,
        s.finished,
    )


def _send(r: Any) -> Send:
    return Send(
        r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6], r[7], r[8], r[9], r[10], r[11], r[12]
    )
