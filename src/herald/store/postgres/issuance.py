"""PostgreSQL: the embedded issuer's shared state (`Issuance`): its signing key and the sign-in
codes redeemed."""

from __future__ import annotations

from datetime import UTC, datetime

from herald.store.contract import Issuance
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter

KEY_NAME = "signing"


class PostgresIssuance(PostgresWriter, Issuance):
    async def issuer_key(self, candidate: bytes) -> bytes:
        created = datetime.now(UTC)

        async def run(tx: Tx) -> bytes:
            await tx.conn.execute(
                "INSERT INTO issuer_keys (name, secret, created) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING",
                KEY_NAME,
                candidate,
                created,
            )
            # A statement of its own, so a new snapshot: it sees the row of a concurrent first
            # caller that committed while the insert waited for it.
            stored = await tx.conn.fetchval(
                "SELECT secret FROM issuer_keys WHERE name = $1", KEY_NAME
            )
            return bytes(stored)

        return await self._op(None, run)

    async def redeem_code(self, code_id: str, expires: datetime, now: datetime) -> bool:
        async def run(tx: Tx) -> bool:
            # An unexpired record wins (the conflicting row is locked and not returned); an
            # expired one the sweeper has not removed yet is replaced.
            taken = await tx.conn.fetchval(
                "INSERT INTO redeemed_codes (code_id, expires) VALUES ($1, $2)"
                " ON CONFLICT (code_id) DO UPDATE SET expires = excluded.expires"
                " WHERE redeemed_codes.expires <= $3 RETURNING code_id",
                code_id,
                expires,
                now,
            )
            return taken is not None

        return await self._op(None, run)
