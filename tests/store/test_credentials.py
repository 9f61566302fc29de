"""The `PushCredentials` contract on every backend."""

from __future__ import annotations

import asyncio

from herald.store import Store

from .conftest import Backend
from .support import APP, OTHER_APP, two_nodes


async def test_push_credentials(store: Store) -> None:
    assert await store.get_push_credentials(APP) == {}
    assert await store.put_push_credentials(APP, "apns", b"key-1") == b"key-1"
    assert await store.put_push_credentials(APP, "fcm", b"\x00\xffsa") == b"\x00\xffsa"
    assert await store.put_push_credentials(OTHER_APP, "apns", b"theirs") == b"theirs"
    assert await store.get_push_credentials(APP) == {"apns": b"key-1", "fcm": b"\x00\xffsa"}
    # replace=False keeps what is there and returns it; the default replaces.
    assert await store.put_push_credentials(APP, "apns", b"key-2", replace=False) == b"key-1"
    assert await store.put_push_credentials(APP, "apns", b"key-3") == b"key-3"
    assert await store.put_push_credentials(APP, "wns", b"w", replace=False) == b"w"
    assert await store.get_push_credentials(APP) == {
        "apns": b"key-3",
        "fcm": b"\x00\xffsa",
        "wns": b"w",
    }
    assert await store.delete_push_credentials(APP, "apns")
    assert not await store.delete_push_credentials(APP, "apns")
    assert not await store.delete_push_credentials(APP, "vapid")
    assert await store.get_push_credentials(APP) == {"fcm": b"\x00\xffsa", "wns": b"w"}
    assert await store.get_push_credentials(OTHER_APP) == {"apns": b"theirs"}


async def test_first_time_generation_agrees_on_one_key(durable_backend: Backend) -> None:
    """Concurrent `replace=False` puts, on two nodes: every caller gets the one stored key."""
    async with two_nodes(durable_backend) as (a, b):
        for round in range(3):
            kind = f"vapid-{round}"
            got = await asyncio.gather(
                *(
                    s.put_push_credentials(APP, kind, f"key-{i}".encode(), replace=False)
                    for i in range(10)
                    for s in (a, b)
                )
            )
            assert len(set(got)) == 1
            assert (await a.get_push_credentials(APP))[kind] == got[0]
