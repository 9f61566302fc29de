"""SQLite: each app's webhooks and their delivery state (`Webhooks`)."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.store.contract import Webhook, Webhooks
from herald.store.rows import from_micros, to_micros
from herald.store.settlement import clean_error
from herald.store.sqlite.changefeed import enable
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase
from herald.store.webhooks import WEBHOOK_COLUMNS, webhook_from_row


def _micros(dt: datetime | None) -> int | None:
    return None if dt is None else to_micros(dt)


class SqliteWebhooks(SqliteDatabase, Webhooks):
    async def add_webhook(self, hook: Webhook, limit: int) -> Webhook:
        def job(c: Connection) -> Webhook:
            (count,) = c.execute(
                "SELECT count(*) FROM webhooks WHERE app = ?", (hook.app,)
            ).fetchone()
            if count >= limit:
                raise QuotaExceeded(f"An app may have at most {limit} webhooks.")
            enable(c, hook.app, to_micros(hook.created))
            (head,) = c.execute("SELECT coalesce(max(seq), 0) FROM app_changes").fetchone()
            try:
                c.execute(
                    f"INSERT INTO webhooks ({WEBHOOK_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, NULL, NULL, NULL)",
                    (
                        hook.id,
                        hook.app,
                        hook.url,
                        hook.secret,
                        ",".join(hook.kinds),
                        hook.status,
                        head,
                        to_micros(hook.created),
                        to_micros(hook.last_modified),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"A webhook with id '{hook.id}' exists.") from exc
            return _get(c, hook.app, hook.id) or hook

        return await self._write(job)

    async def get_webhook(self, app: str, id: str) -> Webhook | None:
        return await self._read(lambda c: _get(c, app, id))

    async def list_webhooks(self, app: str) -> list[Webhook]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app = ?"
                " ORDER BY created_date_time, id",
                (app,),
            ).fetchall()
        )
        return [webhook_from_row(r, from_micros) for r in rows]

    async def update_webhook(self, hook: Webhook) -> Webhook:
        def job(c: Connection) -> Webhook:
            changed = c.execute(
                "UPDATE webhooks SET url = ?, secret = ?, kinds = ?, status = ?,"
                " last_modified_date_time = ?, failures = ?, failing_since = ?, next_attempt = ?"
                " WHERE id = ? AND app = ?",
                (
                    hook.url,
                    hook.secret,
                    ",".join(hook.kinds),
                    hook.status,
                    to_micros(hook.last_modified),
                    hook.failures,
                    _micros(hook.failing_since),
                    _micros(hook.next_attempt),
                    hook.id,
                    hook.app,
                ),
            ).rowcount
            found = _get(c, hook.app, hook.id) if changed else None
            if found is None:
                raise NotFound(f"Webhook '{hook.id}' does not exist.")
            return found

        return await self._write(job)

    async def delete_webhook(self, app: str, id: str) -> bool:
        return await self._write(
            lambda c: (
                c.execute("DELETE FROM webhooks WHERE id = ? AND app = ?", (id, app)).rowcount > 0
            )
        )

    async def due_webhooks(self, now: datetime) -> list[Webhook]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks w WHERE status = 'active'"
                " AND (next_attempt IS NULL OR next_attempt <= ?)"
                " AND EXISTS (SELECT 1 FROM app_changes f WHERE f.app = w.app AND f.seq > w.cursor)"
                " ORDER BY id",
                (to_micros(now),),
            ).fetchall()
        )
        return [webhook_from_row(r, from_micros) for r in rows]

    async def webhooks_active(self) -> bool:
        row = await self._read(
            lambda c: c.execute(
                "SELECT EXISTS (SELECT 1 FROM webhooks WHERE status = 'active')"
            ).fetchone()
        )
        return bool(row[0])

    async def webhook_delivered(
        self, id: str, after: int, cursor: int, now: datetime, status: int | None
    ) -> bool:
        at = to_micros(now)
        attempted = "" if status is None else ", last_attempt = ?4, last_success = ?4"
        return await self._write(
            lambda c: (
                c.execute(
                    f"UPDATE webhooks SET cursor = ?3, failures = 0, failing_since = NULL,"
                    f" next_attempt = NULL, last_status = coalesce(?5, last_status),"
                    f" last_error = CASE WHEN ?5 IS NULL THEN last_error END{attempted}"
                    " WHERE id = ?1 AND cursor = ?2",
                    (id, after, cursor, at, status),
                ).rowcount
                > 0
            )
        )

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
        at = to_micros(now)
        return await self._write(
            lambda c: (
                c.execute(
                    "UPDATE webhooks SET failures = failures + 1,"
                    " failing_since = coalesce(failing_since, ?3), last_attempt = ?3,"
                    " last_status = ?4, last_error = ?5, next_attempt = ?6,"
                    " status = CASE WHEN ?7 THEN 'failed' ELSE status END"
                    " WHERE id = ?1 AND cursor = ?2 AND status = 'active'",
                    (id, after, at, status, clean_error(error), to_micros(next_attempt), give_up),
                ).rowcount
                > 0
            )
        )


def _get(c: Connection, app: str, id: str) -> Webhook | None:
    row = c.execute(
        f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ? AND app = ?", (id, app)
    ).fetchone()
    return None if row is None else webhook_from_row(row, from_micros)
