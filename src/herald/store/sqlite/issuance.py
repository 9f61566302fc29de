"""SQLite: the embedded issuer's state (`Issuance`): its signing key and the sign-in codes
redeemed."""

from __future__ import annotations

from datetime import UTC, datetime

from herald.store.contract import Issuance
from herald.store.rows import to_micros
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase

KEY_NAME = "signing"


class SqliteIssuance(SqliteDatabase, Issuance):
    async def issuer_key(self, candidate: bytes) -> bytes:
        created = to_micros(datetime.now(UTC))

        def job(c: Connection) -> bytes:
            c.execute(
                "INSERT INTO issuer_keys (name, secret, created) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (KEY_NAME, candidate, created),
            )
            (stored,) = c.execute(
                "SELECT secret FROM issuer_keys WHERE name = ?", (KEY_NAME,)
            ).fetchone()
            return bytes(stored)

        return await self._write(job)

    async def redeem_code(self, code_id: str, expires: datetime, now: datetime) -> bool:
        def job(c: Connection) -> bool:
            taken = c.execute(
                "INSERT INTO redeemed_codes (code_id, expires) VALUES (?, ?)"
                " ON CONFLICT (code_id) DO UPDATE SET expires = excluded.expires"
                " WHERE redeemed_codes.expires <= ? RETURNING code_id",
                (code_id, to_micros(expires), to_micros(now)),
            ).fetchone()
            return taken is not None

        return await self._write(job)
