"""PostgreSQL: the answers recorded for Idempotency-Keys (`Idempotency`); `puts.py` records
them."""

from __future__ import annotations

from datetime import datetime

from herald.store.contract import Idempotency, Remembered
from herald.store.postgres.connection import translated
from herald.store.postgres.writer import PostgresWriter


class PostgresIdempotency(PostgresWriter, Idempotency):
    async def recall(self, scope: str, key: str, now: datetime) -> Remembered | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT fingerprint, status, body, location FROM idempotency"
                " WHERE scope = $1 AND key = $2 AND expires > $3",
                scope,
                key,
                now,
            )
        return None if row is None else Remembered(row[0], row[1], bytes(row[2]), row[3])
