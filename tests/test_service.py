"""The composition root without HTTP: `herald.service` builds the services and `lifespan` runs
them, with no ASGI app, no server and nothing of `herald.api` loaded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from herald.errors import HeraldError
from herald.model import (
    ApnsChannel,
    Change,
    ChangeKind,
    DevicePlatform,
    Provider,
    Subscription,
)
from herald.service import Services, build_services, lifespan
from tests.conftest import make_settings
from tests.store.support import APP, content

WAIT = 10.0


class Device:
    """A live stream's writer that records what it is sent (`outbound.streams.Sink`)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.listening = asyncio.Event()
        self.arrived = asyncio.Event()
        self.closed: tuple[str, str] | None = None
        self.gone = asyncio.Event()

    async def start(self) -> None: ...

    async def ready(self, position: int) -> None:
        self.listening.set()  # registered with the broker: what is posted now reaches it

    async def change(self, change: Change) -> None:
        self.changes.append(change)
        self.arrived.set()

    async def keepalive(self) -> None: ...

    async def close(self, reason: str, text: str) -> None:
        self.closed = (reason, text)
        self.gone.set()


def subscription(services: Services, user: str, platform: DevicePlatform) -> Subscription:
    now = services.feed.clock()
    return Subscription(
        id=f"sub-{user}-{platform.value}",
        user_id=user,
        app=APP,
        platform=platform,
        display_name=None,
        push_channel=ApnsChannel("ab" * 32) if platform is DevicePlatform.IOS else None,
        expiration_date_time=now + timedelta(days=1),
        created_date_time=now,
        last_modified_date_time=now,
    )


async def test_a_notification_reaches_a_live_stream_and_the_push_queue_without_http(
    tmp_path: Path, store_url: str | None
) -> None:
    # The app has no APNs credentials: the push engine puts the push off (to retry once an
    # operator sets them), so it stays queued for the test to count, and nothing leaves the host.
    settings = make_settings(tmp_path, store_url=store_url or "")
    services = build_services(settings)
    assert services.pusher is not None
    before = asyncio.all_tasks()
    async with lifespan(services) as s:
        phone = subscription(s, "u1", DevicePlatform.IOS)
        await s.store.add_subscription(phone, 10, s.feed.clock())
        device = Device()

        async def connected() -> None:
            live = subscription(s, "u1", DevicePlatform.LIVE)
            async with s.streams.stream(device, live, time.time() + 3600, 0):
                await device.gone.wait()

        stream = asyncio.create_task(connected())
        await asyncio.wait_for(device.listening.wait(), WAIT)
        n, created = await s.feed.post("u1", APP, content("a1"))
        assert created
        await asyncio.wait_for(device.arrived.wait(), WAIT)
        assert [(c.kind, c.notification_id) for c in device.changes] == [(ChangeKind.CREATED, n.id)]
        deadline = time.monotonic() + WAIT
        while await s.store.count_deliveries(Provider.APNS) != 1:
            assert time.monotonic() < deadline, "the push was not queued"
            await asyncio.sleep(0.01)
        s.streams.close_all()  # what the server does before it shuts down
        await asyncio.wait_for(stream, WAIT)
        assert device.closed is not None and device.closed[0] == "shutdown"
    # Clean: every task the services started has ended, and the store is closed.
    assert asyncio.all_tasks() - before == set()
    try:
        await services.store.ping()
    except HeraldError:
        pass
    else:
        raise AssertionError("the store still answers after the lifespan ended")


async def test_the_lifespan_starts_every_service_and_leaves_no_task_behind(tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path, push_enabled=True))
    assert services.pusher is not None
    before = asyncio.all_tasks()
    async with lifespan(services) as s:
        assert s is services
        await s.store.ping()
        started = asyncio.all_tasks() - before
        # the sweeper, the log reporter, the dispatcher, the push lanes and the stream ticker
        assert len(started) >= 5
    assert asyncio.all_tasks() - before == set()


async def test_a_service_that_fails_to_start_stops_those_started_before_it(
    tmp_path: Path,
) -> None:
    services = build_services(make_settings(tmp_path))

    async def broken() -> None:
        raise RuntimeError("the dispatcher cannot start")

    services.dispatcher.start = broken  # type: ignore[method-assign]
    before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match="cannot start"):
        async with lifespan(services):
            raise AssertionError("the lifespan ran without its dispatcher")
    # The sweeper, the reporter and the push lanes started before it: all stopped again.
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(HeraldError):
        await services.store.ping()


def test_the_services_load_nothing_of_http() -> None:
    """A process with no HTTP imports the root without the API, the server or uvicorn."""
    code = (
        "import sys, herald.service\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('herald.api', 'herald.server',"
        " 'herald.connections', 'uvicorn', 'starlette.applications', 'starlette.routing')))\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
