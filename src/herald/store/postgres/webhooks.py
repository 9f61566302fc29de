"""PostgreSQL: each app's webhooks and their delivery state (`Webhooks`)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.store.contract import Webhook, Webhooks
from herald.store.postgres.changefeed import enable, stamp
from herald.store.postgres.connection import identity, translated
from herald.store.postgres.writer import PostgresWriter
from herald.store.settlement import clean_error
from herald.store.webhooks import WEBHOOK_COLUMNS, webhook_from_row


class PostgresWebhooks(PostgresWriter, Webhooks):
    async def add_webhook(self, hook: Webhook, limit: int) -> Webhook:
        async with translated(), self._acquire() as conn:
            await enable(conn, hook.app, hook.created)
            await stamp(conn)  # the head below then counts every change committed before
            return await _add(conn, hook, limit)

    async def get_webhook(self, app: str, id: str) -> Webhook | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1 AND app = $2", id, app
            )
        return None if row is None else webhook_from_row(tuple(row), identity)

    async def list_webhooks(self, app: str) -> list[Webhook]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app = $1"
                " ORDER BY created_date_time, id",
                app,
            )
        return [webhook_from_row(tuple(r), identity) for r in rows]

    async def update_webhook(self, hook: Webhook) -> Webhook:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE webhooks SET url = $3, secret = $4, kinds = $5, status = $6,"
                " last_modified_date_time = $7, failures = $8, failing_since = $9,"
                f" next_attempt = $10 WHERE id = $1 AND app = $2 RETURNING {WEBHOOK_COLUMNS}",
                hook.id,
                hook.app,
                hook.url,
                hook.secret,
                ",".join(hook.kinds),
                hook.status,
                hook.last_modified,
                hook.failures,
                hook.failing_since,
                hook.next_attempt,
            )
        if row is None:
            raise NotFound(f"Webhook '{hook.id}' does not exist.")
        return webhook_from_row(tuple(row), identity)

    async def delete_webhook(self, app: str, id: str) -> bool:
        async with translated(), self._acquire() as conn:
            gone = await conn.fetchval(
                "DELETE FROM webhooks WHERE id = $1 AND app = $2 RETURNING id", id, app
            )
        return gone is not None

    async def due_webhooks(self, now: datetime) -> list[Webhook]:
        async with translated(), self._acquire() as conn:
            await stamp(conn)  # changes committed before this read count
            rows = await conn.fetch(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks w WHERE status = 'active'"
                " AND (next_attempt IS NULL OR next_attempt <= $1)"
                " AND EXISTS (SELECT FROM app_changes f WHERE f.app = w.app AND f.seq > w.cursor)"
                " ORDER BY id",
                now,
            )
        return [webhook_from_row(tuple(r), identity) for r in rows]

    async def webhooks_active(self) -> bool:
        async with translated(), self._acquire() as conn:
            found = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM webhooks WHERE status = 'active')"
            )
        return bool(found)

    async def webhook_delivered(
        self, id: str, after: int, cursor: int, now: datetime, status: int | None
    ) -> bool:
        async with translated(), self._acquire() as conn:
            done = await conn.fetchval(
                "UPDATE webhooks SET cursor = $3, failures = 0, failing_since = NULL,"
                " next_attempt = NULL, last_status = coalesce($5, last_status),"
                " last_error = CASE WHEN $5::integer IS NULL THEN last_error END,"
                " last_attempt = CASE WHEN $5::integer IS NULL THEN last_attempt ELSE $4 END,"
                " last_success = CASE WHEN $5::integer IS NULL THEN last_success ELSE $4 END"
                " WHERE id = $1 AND cursor = $2 RETURNING id",
                id,
                after,
                cursor,
                now,
                status,
            )
        return done is not None

    async def webhook_failed(
        self,
        id: str,
        after: int,
        now: datetime,
        status: int | None,
        error: str,
        next_attempt: datetime,
        give_up: bool,
    ) -> bool:
        async with translated(), self._acquire() as conn:
            done = await conn.fetchval(
                "UPDATE webhooks SET failures = failures + 1,"
                " failing_since = coalesce(failing_since, $3), last_attempt = $3,"
                " last_status = $4, last_error = $5, next_attempt = $6,"
                " status = CASE WHEN $7 THEN 'failed' ELSE status END"
                " WHERE id = $1 AND cursor = $2 AND status = 'active' RETURNING id",
                id,
                after,
                now,
                status,
                clean_error(error),
                next_attempt,
                give_up,
            )
        return done is not None


async def _add(conn: asyncpg.Connection, hook: Webhook, limit: int) -> Webhook:
    async with conn.transaction():
        # Serialise adds per app, so two concurrent ones cannot both pass the count.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"webhooks:{hook.app}")
        count = await conn.fetchval("SELECT count(*) FROM webhooks WHERE app = $1", hook.app)
        if count >= limit:
            raise QuotaExceeded(f"An app may have at most {limit} webhooks.")
        # The feed's head, as a reader would see it (numbering what has committed first).
        head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM app_changes")
        added = await conn.fetchval(
            f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7,"
            " $8, $9, 0, NULL, NULL, NULL, NULL, NULL, NULL) ON CONFLICT DO NOTHING"
            " RETURNING id",
            hook.id,
            hook.app,
            hook.url,
            hook.secret,
            ",".join(hook.kinds),
            hook.status,
            head,
            hook.created,
            hook.last_modified,
        )
        if added is None:
            raise Conflict(f"A webhook with id '{hook.id}' exists.")
        row = await conn.fetchrow(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1", hook.id)
    assert row is not None
    return webhook_from_row(tuple(row), identity)
