"""What the contract suite's files share: the clock and apps they use, and ways to build the
records they start from."""

from __future__ import annotations

from datetime import datetime

from herald.store import Store
from herald.store.rows import to_micros


async def remembered(
    store: Store,
    scope: str,
    key: str,
    fingerprint: str,
    status: int,
    body: bytes,
    location: str | None,
    expires: datetime,
) -> None:
    """An Idempotency-Key record written behind the store's back, as another process or node
    (or an older Herald) left it: the store writes records only with their notification
    (`put_once`), and these tests need one on its own."""
    values = (scope, key, fingerprint, status, body, location)
    from herald.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        assert store._conn is not None
        store._conn.execute(
            "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)", (*values, to_micros(expires))
        )
        return
    from herald.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    async with store._acquire() as conn:
        await conn.execute(
            "INSERT INTO idempotency VALUES ($1, $2, $3, $4, $5, $6, $7)", *values, expires
        )
