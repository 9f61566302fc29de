"""The HTTP/1.1 client of Web Push, FCM, WNS and webhooks (`outbound/providers/http1.py`) against
a scripted server on 127.0.0.1, on uvloop as in `herald serve`: keep-alive, the framings an
answer may use, bounds, timeouts, a connection the server dropped, and header injection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
import uvloop

from herald.outbound.providers import http1
from herald.outbound.providers.clients import Http1, exchange, tls_context
from tests.outbound.scripted import CREATED, Script, Scripted


def run(
    test: Callable[[Http1, Scripted], Awaitable[None]], *scripts: Script, timeout: float = 2.0
) -> None:
    async def main() -> None:
        server = Scripted(*scripts)
        client = Http1(tls_context(""), timeout)
        try:
            await test(client, server)
        finally:
            await client.aclose()
            await server.stop()

    uvloop.run(main())


def test_a_request_is_written_as_sent_and_its_connection_kept() -> None:
    async def test(client: Http1, server: Scripted) -> None:
        url = await server.start()
        for _ in range(3):
            answer = await exchange(
                client, "POST", url, content=b"hello", headers={"TTL": "60", "Topic": "t1"}
            )
            assert answer.status_code == 201 and answer.content == b""
            assert answer.headers["location"] == "/m/1" and answer.headers.get("LOCATION")
        assert server.connections == 1  # kept alive
        head, body = server.requests[0].split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /push/a?b=1 HTTP/1.1" and body == b"hello"
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        assert fields[b"Host"] == b"127.0.0.1:" + url.split(":")[2].split("/")[0].encode()
        assert fields[b"Content-Length"] == b"5" and fields[b"TTL"] == b"60"
        assert fields[b"Accept-Encoding"] == b"identity" and b"Cookie" not in fields
        # A header the caller names replaces the client's own, whatever its case.
        await exchange(client, "POST", url, content=b"", headers={"user-agent": "Hooks/1"})
        named = [line.lower() for line in server.requests[-1].split(b"\r\n")]
        assert [n for n in named if n.startswith(b"user-agent:")] == [b"user-agent: hooks/1"]
        form = await exchange(client, "POST", url, data={"grant_type": "x y", "scope": "a&b"})
        assert form.status_code == 201
        assert server.requests[-1].endswith(b"\r\n\r\ngrant_type=x+y&scope=a%26b")
        assert b"application/x-www-form-urlencoded" in server.requests[-1]

    run(test)


def test_every_framing_of_an_answer_is_read_and_a_long_body_is_cut() -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n"
        b'Content-Type: application/json\r\n\r\n5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
    )
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + CREATED
    until_close = b"HTTP/1.1 410 Gone\r\nConnection: close\r\nX-A: 1\r\nX-A: 2\r\n\r\nthe end"
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000

    async def test(client: Http1, server: Scripted) -> None:
        url = await server.start()
        first = await exchange(client, "POST", url, content=b"")
        assert first.status_code == 400 and first.json() == {"a": 1}
        assert (await exchange(client, "POST", url, content=b"")).status_code == 201
        assert server.connections == 1
        gone = await exchange(client, "POST", url, content=b"")
        assert (gone.status_code, gone.content, gone.headers["x-a"]) == (410, b"the end", "1, 2")
        big = await exchange(client, "POST", url, content=b"")
        assert big.status_code == 200 and big.content == b"x" * http1.MAX_ANSWER
        assert (await exchange(client, "POST", url, content=b"")).status_code == 201
        assert server.connections == 3  # neither the closed one nor the cut one was reused

    run(test, chunked, interim, until_close, huge)


def test_a_kept_connection_the_server_dropped_is_replaced_once() -> None:
    async def test(client: Http1, server: Scripted) -> None:
        url = await server.start()
        assert (await exchange(client, "POST", url, content=b"1")).status_code == 201
        # The kept connection is closed as the second request reaches it: sent again on a new one.
        assert (await exchange(client, "POST", url, content=b"2")).status_code == 201
        assert server.connections == 2 and len(server.requests) == 3
        # A new connection closed without an answer is a failure, not retried.
        fresh = Http1(tls_context(""), 2.0)
        with pytest.raises(httpx.ConnectError):
            await exchange(fresh, "POST", url, content=b"3")
        await fresh.aclose()
        assert server.connections == 3 and len(server.requests) == 4

    run(test, CREATED, None, CREATED, None)


def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped() -> None:
    async def hang(client: Http1, server: Scripted) -> None:
        url = await server.start()
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await exchange(client, "POST", url, content=b"")
        assert 0.25 <= time.monotonic() - started < 2
        assert (await exchange(client, "POST", url, content=b"")).status_code == 201
        assert server.connections == 2

    # The server sends half an answer, then nothing.
    run(hang, b"HTTP/1.1 201 Created\r\nContent-Le", timeout=0.3)


def test_bad_answers_and_bad_headers_are_errors() -> None:
    async def test(client: Http1, server: Scripted) -> None:
        url = await server.start()
        with pytest.raises(httpx.RemoteProtocolError):
            await exchange(client, "POST", url, content=b"")
        with pytest.raises(httpx.RemoteProtocolError):
            await exchange(client, "POST", url, content=b"")
        for bad in ({"Topic": "a\r\nX-Evil: 1"}, {"X-A\r\nB": "1"}, {"Topic": "\n"}):
            with pytest.raises(httpx.LocalProtocolError):
                await exchange(client, "POST", url, content=b"", headers=bad)
        assert len(server.requests) == 2  # nothing of those was sent
        with pytest.raises(httpx.UnsupportedProtocol):
            await exchange(client, "POST", "ftp://127.0.0.1/x", content=b"")

    many = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * 70_000 + b"\r\n\r\n"
    run(test, b"SPDY/9 what\r\n\r\n", many)


def test_idle_connections_are_closed_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "KEEP_IDLE", 0.2)

    async def test(client: Http1, server: Scripted) -> None:
        url = await server.start()
        assert (await exchange(client, "POST", url, content=b"")).status_code == 201
        await asyncio.sleep(0.3)
        assert (await exchange(client, "POST", url, content=b"")).status_code == 201
        await asyncio.sleep(0.05)
        assert server.connections == 2 and server.closed_by_client == 1

    run(test)
