"""The `Issuance` contract on every backend: the embedded issuer's signing key, written once, and
sign-in codes redeemed once, also when two stores (two nodes) share one database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from herald.store import Store

from .conftest import Backend
from .support import T0


async def test_the_first_key_is_kept(store: Store) -> None:
    assert await store.issuer_key(b"first") == b"first"
    assert await store.issuer_key(b"second") == b"first"


async def test_concurrent_first_callers_on_two_nodes_agree_on_one_key(
    durable_backend: Backend,
) -> None:
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        keys = await asyncio.gather(
            *(s.issuer_key(f"key-{i}".encode()) for i in range(10) for s in (a, b))
        )
        assert len(set(keys)) == 1, keys
        assert await a.issuer_key(b"later") == await b.issuer_key(b"later") == keys[0]
    finally:
        await a.close()
        await b.close()


async def test_a_code_is_redeemed_once_until_its_record_expires(store: Store) -> None:
    expires = T0 + timedelta(minutes=10)
    assert await store.redeem_code("c1", expires, T0)
    assert not await store.redeem_code("c1", expires, T0 + timedelta(minutes=5))
    assert await store.redeem_code("c2", expires, T0)
    # An expired record (not swept yet) no longer holds the code.
    assert await store.redeem_code("c1", expires + timedelta(minutes=10), expires)


async def test_a_code_redeemed_at_once_on_two_nodes_is_redeemed_once(
    durable_backend: Backend,
) -> None:
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        expires = T0 + timedelta(minutes=10)
        for i in range(20):
            results = await asyncio.gather(
                a.redeem_code(f"code-{i}", expires, T0), b.redeem_code(f"code-{i}", expires, T0)
            )
            assert sorted(results) == [False, True], (i, results)
    finally:
        await a.close()
        await b.close()


async def test_sweep_removes_expired_codes(store: Store) -> None:
    expires = T0 + timedelta(minutes=10)
    await store.redeem_code("c1", expires, T0)
    await store.sweep(expires, T0, 100)
    # Swept: a record written now with a later expiry is a first redemption again...
    assert await store.redeem_code("c1", expires + timedelta(minutes=10), T0)
    # ...and one not yet expired at sweep time is kept.
    await store.sweep(expires, T0, 100)
    assert not await store.redeem_code("c1", expires, T0)
