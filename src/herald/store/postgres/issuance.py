"""PostgreSQL: the embedded issuer's shared state (`Issuance`): its signing key and the sign-in
codes redeemed.

Each a statement of its own (autocommit) on a pooled connection, not an op of the writers' batch
transactions: two nodes' batches would lock the rows of several codes in different orders and
deadlock (measured: 10 codes redeemed on two nodes at once got 503s), while one statement locks
one row."""

from __future__ import annotations

from datetime import UTC, datetime

from herald.store.contract import Issuance
from herald.store.postgres.connection import translated
from herald.store.postgres.writer import PostgresWriter

KEY_NAME = "signing"


class PostgresIssuance(PostgresWriter, Issuance):
    async def issuer_key(self, candidate: bytes) -> bytes:
        async with translated(), self._acquire() as conn:
            await conn.execute(
                "INSERT INTO issuer_keys (name, secret, created) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING",
                KEY_NAME,
                candidate,
                datetime.now(UTC),
            )
            # A statement of its own, so a new snapshot: it sees the row of a concurrent first
            # caller that committed while the insert waited for it.
            stored = await conn.fetchval("SELECT secret FROM issuer_keys WHERE name = $1", KEY_NAME)
        return bytes(stored)

    async def redeem_code(self, code_id: str, expires: datetime, now: datetime) -> bool:
        async with translated(), self._acquire() as conn:
            # An unexpired record wins (the conflicting row is locked and not returned); an
            # expired one the sweeper has not removed yet is replaced.
            taken = await conn.fetchval(
                "INSERT INTO redeemed_codes (code_id, expires) VALUES ($1, $2)"
                " ON CONFLICT (code_id) DO UPDATE SET expires = excluded.expires"
                " WHERE redeemed_codes.expires <= $3 RETURNING code_id",
                code_id,
                expires,
                now,
            )
        return taken is not None
