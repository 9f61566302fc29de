"""The send runner (herald/sends.py) on a real store: a batch redone after a crash, because its
notifications committed but its progress did not, writes nothing again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from herald.errors import Unavailable
from herald.model import Content
from herald.query import Query
from herald.sends import Sends
from herald.store import Send
from herald.store.sqlite import SqliteStore
from tests.store.support import APP, T0, content

USERS = [f"u{i}" for i in range(7)]


class LosesProgress:
    """The store, except that the first progress record fails (the process died before it)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.lost = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def send_progress(self, *args: Any) -> None:
        if not self.lost:
            self.lost = True
            raise Unavailable("killed")
        await self.store.send_progress(*args)


def send(body: Content) -> Send:
    return Send(
        id="s1",
        app=APP,
        idempotency_key=None,
        fingerprint="fp",
        audience=None,
        content=msgspec.msgpack.encode(body),
        total=len(USERS),
        done=0,
        failed=0,
        status="notStarted",
        created=T0,
        last_action=T0,
    )


async def test_a_redone_batch_creates_no_second_notification(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'herald.db'}")
    await store.open()
    try:
        await store.start_send(send(content()), USERS, 100)
        lossy = LosesProgress(store)
        # (No dispatcher drains this store's outbox: the runner need not wait for one.)
        runner = Sends(lossy, lambda: T0, batch=3, backlog_wait=0)  # type: ignore[arg-type]
        stored = await store.get_send(APP, "s1")
        assert stored is not None
        try:
            await runner.advance(stored, time.monotonic() + 10)
        except Unavailable:
            pass
        else:
            raise AssertionError("the progress record was meant to fail")
        stored = await store.get_send(APP, "s1")
        assert stored is not None and stored.done == 0  # so the first batch is done again
        await runner.advance(stored, time.monotonic() + 10)
        finished = await store.get_send(APP, "s1")
        assert finished is not None
        assert (finished.status, finished.done, finished.failed) == ("succeeded", 7, 0)
        for user in USERS:
            page = await store.list(user, APP, Query(), T0)
            assert len(page.items) == 1, (user, page.items)
            assert [c.position for c in await store.changes(user, APP, 0, 10)] == [1]
    finally:
        await store.close()
