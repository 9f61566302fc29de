"""The Broker contract (herald/broker/base.py), run against every backend.

Written for brokers that deliver asynchronously (a networked one hands a change to a server and
gets it back on a reader task): a test waits until what it expects has arrived, then checks
that nothing else did. Listeners on several nodes are used where a backend has them; the
memory broker's nodes are one broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from herald.broker import Broker
from herald.model import Change, ChangeKind

from .conftest import Cluster

WAIT = 5.0
APP = "app.example.com"
OTHER_APP = "other.example.com"


def change(user: str, position: int, app: str = APP) -> Change:
    return Change(
        user_id=user,
        position=position,
        kind=ChangeKind.CREATED,
        app=app,
        notification_id=f"{user}-{position}",
        at=datetime(2030, 1, 1, tzinfo=UTC),
    )


class Recorder:
    """A listener that keeps what it is given. It starts at position 0 and drops nothing (so a
    duplicate or a late change shows)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.revoked: list[str] = []
        self.sent = 0

    def deliver(self, change: Change) -> None:
        self.changes.append(change)

    def revoke(self, subscription_id: str) -> None:
        self.revoked.append(subscription_id)

    @property
    def positions(self) -> list[int]:
        return [c.position for c in self.changes]


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def publish(broker: Broker, *changes: Change) -> None:
    """Publish in order; a publish that waits on a listener fails the test instead of hanging."""
    async with asyncio.timeout(WAIT):
        for c in changes:
            await broker.publish(c)


async def test_a_change_reaches_every_listener_of_its_pair_once_in_order(cluster: Cluster) -> None:
    here, there = await cluster.node(), await cluster.node()
    near, far = Recorder(), Recorder()
    here.listen("u", APP, near)
    there.listen("u", APP, far)
    await publish(here, *(change("u", p) for p in range(1, 201)))
    await until(lambda: len(near.changes) >= 200 and len(far.changes) >= 200, "all 200")
    # Anything late (a duplicate) would arrive before this marker, which is published last.
    await publish(here, change("u", 201))
    await until(lambda: 201 in near.positions and 201 in far.positions, "the marker")
    assert near.positions == far.positions == list(range(1, 202))
    assert near.changes[0] == change("u", 1)  # the change itself, not a copy with losses


async def test_a_listener_sees_only_its_own_user_and_app(cluster: Cluster) -> None:
    publisher, subscriber = await cluster.node(), await cluster.node()
    pairs = [("u1", APP), ("u2", APP), ("u1", OTHER_APP), ("u2", OTHER_APP)]
    listeners = {pair: Recorder() for pair in pairs}
    for (user, app), listener in listeners.items():
        subscriber.listen(user, app, listener)
    rng = random.Random(13)
    # Positions are per user, across apps (as the change log numbers them).
    head = {"u1": 0, "u2": 0}
    sent: dict[tuple[str, str], list[int]] = {pair: [] for pair in pairs}
    for _ in range(400):
        user, app = pair = rng.choice(pairs)
        head[user] += 1
        sent[pair].append(head[user])
        await publish(publisher, change(user, head[user], app))
    await until(
        lambda: all(len(listeners[p].changes) >= len(sent[p]) for p in pairs),
        "every pair's changes",
    )
    for (user, app), listener in listeners.items():
        assert {(c.user_id, c.app) for c in listener.changes} == {(user, app)}
        assert listener.positions == sent[(user, app)]


async def test_a_listener_is_not_sent_what_was_published_before_it_listened(
    cluster: Cluster,
) -> None:
    """No storage: a stream closes that gap by replaying the change log after listening."""
    broker = await cluster.node()
    early, late = Recorder(), Recorder()
    broker.listen("u", APP, early)
    await publish(broker, change("u", 1))
    await until(lambda: early.positions == [1], "the first change")
    broker.listen("u", APP, late)
    await publish(broker, change("u", 2))
    await until(lambda: late.positions == [2] and early.positions == [1, 2], "the second")
    assert late.positions == [2]


async def test_unlisten_stops_delivery_to_that_listener_only(cluster: Cluster) -> None:
    broker = await cluster.node()
    leaving, staying = Recorder(), Recorder()
    broker.listen("u", APP, leaving)
    broker.listen("u", APP, staying)
    await publish(broker, change("u", 1))
    await until(lambda: leaving.positions == staying.positions == [1], "the first change")
    broker.unlisten("u", APP, leaving)
    broker.unlisten("u", APP, leaving)  # again: ignored
    broker.unlisten("u", APP, Recorder())  # never listened: ignored
    broker.unlisten("nobody", APP, Recorder())
    await publish(broker, change("u", 2), change("u", 3))
    await until(lambda: staying.positions == [1, 2, 3], "the rest")
    assert leaving.positions == [1]


async def test_a_listener_may_unlisten_while_it_is_delivered_to(cluster: Cluster) -> None:
    """A stream closes on a delivery (e.g. too far behind): that must not disturb the others."""
    broker = await cluster.node()
    before, after = Recorder(), Recorder()

    class Quitter(Recorder):
        def deliver(self, change: Change) -> None:
            super().deliver(change)
            broker.unlisten("u", APP, self)

    quitter = Quitter()
    broker.listen("u", APP, before)
    broker.listen("u", APP, quitter)
    broker.listen("u", APP, after)
    await publish(broker, change("u", 1), change("u", 2))
    await until(lambda: before.positions == after.positions == [1, 2], "both changes")
    assert quitter.positions == [1]


async def test_a_slow_listener_holds_up_neither_publishers_nor_other_listeners(
    cluster: Cluster,
) -> None:
    """A listener buffers for itself (a stream cuts off a client that falls too far behind):
    while its consumer is stuck, publishing and every other listener go on."""
    publisher, subscriber = await cluster.node(), await cluster.node()
    gate = asyncio.Event()
    buffered: asyncio.Queue[Change] = asyncio.Queue()
    consumed: list[int] = []

    class Slow(Recorder):
        def deliver(self, change: Change) -> None:
            buffered.put_nowait(change)

    async def consume() -> None:
        await gate.wait()
        while True:
            consumed.append((await buffered.get()).position)

    consumer = asyncio.create_task(consume())
    try:
        fast = Recorder()
        subscriber.listen("u", APP, Slow())
        subscriber.listen("u", APP, fast)
        await publish(publisher, *(change("u", p) for p in range(1, 501)))
        await until(lambda: len(fast.changes) >= 500, "the fast listener's changes")
        assert fast.positions == list(range(1, 501)) and consumed == []
        gate.set()
        await until(lambda: len(consumed) >= 500, "the slow listener's changes")
        assert consumed == list(range(1, 501))
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer


async def test_a_listener_that_raises_does_not_starve_the_others(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="herald.broker")  # its traceback is expected
    broker = await cluster.node()
    first, last = Recorder(), Recorder()

    class Broken(Recorder):
        def deliver(self, change: Change) -> None:
            raise RuntimeError("a bug in one stream")

    broker.listen("u", APP, first)
    broker.listen("u", APP, Broken())
    broker.listen("u", APP, last)
    await publish(broker, change("u", 1), change("u", 2))
    await until(lambda: first.positions == last.positions == [1, 2], "both changes")


async def test_revoke_reaches_the_listeners_of_its_pair_only(cluster: Cluster) -> None:
    here, there = await cluster.node(), await cluster.node()
    mine = [Recorder(), Recorder()]
    others = {("u", OTHER_APP): Recorder(), ("v", APP): Recorder()}
    here.listen("u", APP, mine[0])
    there.listen("u", APP, mine[1])
    for (user, app), listener in others.items():
        there.listen(user, app, listener)
    await here.revoke("u", APP, "sub-1")
    await until(lambda: all(r.revoked == ["sub-1"] for r in mine), "the revocation")
    # A change published after the revocation arrives after it: nothing else is on its way.
    for user, app in others:
        await publish(here, change(user, 1, app))
    await until(lambda: all(r.positions == [1] for r in others.values()), "the markers")
    assert all(r.revoked == [] for r in others.values())
    assert all(r.changes == [] for r in mine)


async def test_a_closed_broker_delivers_nothing_more(cluster: Cluster) -> None:
    """Close stops delivery to the node's listeners (they are its streams, closing with the
    server); closing again does nothing."""
    closing, other = await cluster.node(), await cluster.node()
    listener = Recorder()
    closing.listen("u", APP, listener)
    await publish(other, change("u", 1))
    await until(lambda: listener.positions == [1], "the change before closing")
    await closing.close()
    await closing.close()
    with contextlib.suppress(Exception):  # publishing through the closed node may fail
        await publish(other, change("u", 2))
    with contextlib.suppress(Exception):
        await closing.revoke("u", APP, "sub-1")
    await asyncio.sleep(0.2)  # a networked broker would have delivered by now
    assert listener.positions == [1] and listener.revoked == []
