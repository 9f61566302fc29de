"""Caps on live streams (docs/devices.md, docs/operations.md): per subscription (browser tabs share
one) and per (user, app), over WebSocket and SSE, against `herald serve` as a real process. One
over a cap is refused with 429 activityLimitReached and Retry-After; open streams are untouched."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.devices import Refused, Stream, open_stream
from tests.processes import register, start

PER_SUBSCRIPTION = 2
PER_USER = 3
SUBS = "/beta/me/notificationSubscriptions"


@dataclass
class Herald:
    url: str
    data: Path
    client_id: str
    host_name: str

    def token(self, user: str | None) -> str:
        issuer = LocalIssuer.load_or_create(self.data, "urn:herald:local", "api://herald")
        return issuer.mint(client_id=self.client_id, user_id=user)

    def subscribe(self, user: str) -> str:
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        body = {"application": self.host_name, "platform": "live"}
        r = httpx.post(f"{self.url}{SUBS}", headers=headers, json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def notify(self, user: str) -> str:
        headers = {"Authorization": f"Bearer {self.token(None)}"}
        body = {"targetHostName": self.host_name, "payload": {"visualContent": {"title": "hi"}}}
        r = httpx.post(f"{self.url}/beta/users/{user}/notifications", headers=headers, json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def refused(self, cap: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "herald_live_streams_refused_total" and sample.labels == {
                    "cap": cap
                }:
                    return float(sample.value)
        return 0.0


@pytest.fixture(scope="module")
def herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Herald]:
    data = tmp_path_factory.mktemp("herald-stream-caps")
    host_name = f"caps-{uuid.uuid4().hex[:8]}.example.com"
    client_id = register(data, None, host_name)
    port = free_port()
    env = {
        "HERALD_MAX_STREAMS_PER_SUBSCRIPTION": str(PER_SUBSCRIPTION),
        "HERALD_MAX_STREAMS_PER_USER": str(PER_USER),
    }
    proc = start(data, port, None, **env)
    try:
        yield Herald(f"http://127.0.0.1:{port}", data, client_id, host_name)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def opened(herald: Herald, protocol: str, sub: str, user: str) -> AsyncIterator[Stream]:
    async with open_stream(protocol, herald.url, sub, herald.token(user)) as stream:
        await stream.ready()
        yield stream


async def refusal(herald: Herald, protocol: str, sub: str, user: str) -> Refused:
    with pytest.raises(Refused) as refused:
        async with opened(herald, protocol, sub, user):
            pass
    return refused.value


def assert_throttled(refused: Refused) -> None:
    assert refused.status == 429, refused
    assert int(refused.headers["retry-after"]) >= 1
    error = json.loads(refused.body)["error"]
    assert error["code"] == "activityLimitReached" and "live streams" in error["message"]


def test_streams_per_subscription_are_capped(herald: Herald) -> None:
    """Two tabs stream on one subscription; a third is refused over WebSocket and over SSE, and
    gets in once a tab closes. The open ones keep streaming."""
    user = f"user-{uuid.uuid4()}"
    sub = herald.subscribe(user)
    before = herald.refused("subscription")

    async def scenario() -> None:
        async with opened(herald, "ws", sub, user) as first:
            async with opened(herald, "sse", sub, user):
                for protocol in ("ws", "sse"):
                    assert_throttled(await refusal(herald, protocol, sub, user))
            # The SSE tab closed: its place is free (once the server has seen it go).
            for _ in range(50):
                try:
                    async with opened(herald, "sse", sub, user):
                        break
                except Refused:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the freed place was never given back")
            posted = await asyncio.to_thread(herald.notify, user)
            assert (await first.next())["id"] == posted

    asyncio.run(scenario())
    assert herald.refused("subscription") == before + 2


def test_streams_per_user_are_capped_across_subscriptions(herald: Herald) -> None:
    """Three streams over two subscriptions of one user: a fourth is refused even on the
    subscription that has room; another user of the app is not affected."""
    user, other = f"user-{uuid.uuid4()}", f"user-{uuid.uuid4()}"
    a, b, c = herald.subscribe(user), herald.subscribe(user), herald.subscribe(other)
    before = herald.refused("user")

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as streams:
            await streams.enter_async_context(opened(herald, "ws", a, user))
            await streams.enter_async_context(opened(herald, "ws", a, user))
            await streams.enter_async_context(opened(herald, "sse", b, user))
            for protocol in ("ws", "sse"):
                assert_throttled(await refusal(herald, protocol, b, user))
            async with opened(herald, "ws", c, other):
                pass

    asyncio.run(scenario())
    assert herald.refused("user") == before + 2
