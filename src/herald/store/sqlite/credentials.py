"""SQLite: each app's push credentials (`PushCredentials`)."""

from __future__ import annotations

from datetime import UTC, datetime

from herald.store.contract import PushCredentials
from herald.store.rows import to_micros
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase


class SqlitePushCredentials(SqliteDatabase, PushCredentials):
    async def get_push_credentials(self, app: str) -> dict[str, bytes]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT kind, secret FROM push_credentials WHERE app = ?", (app,)
            ).fetchall()
        )
        return {kind: bytes(secret) for kind, secret in rows}

    async def put_push_credentials(
        self, app: str, kind: str, secret: bytes, replace: bool = True
    ) -> bytes:
        updated = to_micros(datetime.now(UTC))
        conflict = (
            "DO UPDATE SET secret = excluded.secret, updated = excluded.updated"
            if replace
            else "DO NOTHING"
        )

        def job(c: Connection) -> bytes:
            c.execute(
                "INSERT INTO push_credentials (app, kind, secret, updated) VALUES (?, ?, ?, ?)"
                f" ON CONFLICT (app, kind) {conflict}",
                (app, kind, secret, updated),
            )
            (stored,) = c.execute(
                "SELECT secret FROM push_credentials WHERE app = ? AND kind = ?", (app, kind)
            ).fetchone()
            return bytes(stored)

        return await self._write(job)

    async def delete_push_credentials(self, app: str, kind: str) -> bool:
        def job(c: Connection) -> bool:
            return bool(
                c.execute(
                    "DELETE FROM push_credentials WHERE app = ? AND kind = ?", (app, kind)
                ).rowcount
            )

        return await self._write(job)
