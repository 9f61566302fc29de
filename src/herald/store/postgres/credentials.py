"""PostgreSQL: each app's push credentials (`PushCredentials`)."""

from __future__ import annotations

from datetime import UTC, datetime

from herald.store.contract import PushCredentials
from herald.store.postgres.connection import translated
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter


class PostgresPushCredentials(PostgresWriter, PushCredentials):
    async def get_push_credentials(self, app: str) -> dict[str, bytes]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch("SELECT kind, secret FROM push_credentials WHERE app = $1", app)
        return {r[0]: bytes(r[1]) for r in rows}

    async def put_push_credentials(
        self, app: str, kind: str, secret: bytes, replace: bool = True
    ) -> bytes:
        updated = datetime.now(UTC)
        conflict = (
            "DO UPDATE SET secret = excluded.secret, updated = excluded.updated"
            if replace
            else "DO NOTHING"
        )

        async def run(tx: Tx) -> bytes:
            await tx.conn.execute(
                "INSERT INTO push_credentials (app, kind, secret, updated)"
                f" VALUES ($1, $2, $3, $4) ON CONFLICT (app, kind) {conflict}",
                app,
                kind,
                secret,
                updated,
            )
            # A statement of its own, so a new snapshot: it sees a row another transaction
            # committed while the insert waited for it (a same-statement read would not).
            stored = await tx.conn.fetchval(
                "SELECT secret FROM push_credentials WHERE app = $1 AND kind = $2", app, kind
            )
            return bytes(stored)

        return await self._op(None, run)

    async def delete_push_credentials(self, app: str, kind: str) -> bool:
        async def run(tx: Tx) -> bool:
            deleted = await tx.conn.fetchval(
                "DELETE FROM push_credentials WHERE app = $1 AND kind = $2 RETURNING kind",
                app,
                kind,
            )
            return deleted is not None

        return await self._op(None, run)
