"""SQLite: the answers recorded for Idempotency-Keys (`Idempotency`); `puts.py` records them."""

from __future__ import annotations

from datetime import datetime

from herald.store.contract import Idempotency, Remembered
from herald.store.rows import to_micros
from herald.store.sqlite.database import SqliteDatabase
from herald.store.sqlite.puts import find_record


class SqliteIdempotency(SqliteDatabase, Idempotency):
    async def recall(self, scope: str, key: str, now: datetime) -> Remembered | None:
        return await self._read(lambda c: find_record(c, scope, key, to_micros(now)))
