"""Hostile and idle connections (docs/operations.md), against `herald serve` as a real process,
with raw sockets: request heads that never end or are too long, connections that send nothing,
half a head or half a body, too many waiting connections from one address while a client on
another address is served, and the token endpoint's per-address limit with forged
X-Forwarded-For. Live streams must outlive all these timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port, servers
from tests.devices import open_stream
from tests.processes import register, start

TIMEOUT = 1.0  # header, body and idle timeouts of the module's server (seconds)
MAX_URL = 2048
MAX_HEAD = 8192
PENDING = 8  # pending connections per address
SETTINGS = {
    "HERALD_HEADER_TIMEOUT": str(TIMEOUT),
    "HERALD_BODY_TIMEOUT": str(TIMEOUT),
    "HERALD_IDLE_TIMEOUT": str(TIMEOUT),
    "HERALD_MAX_URL_BYTES": str(MAX_URL),
    "HERALD_MAX_HEADER_BYTES": str(MAX_HEAD),
    "HERALD_MAX_PENDING_PER_ADDRESS": str(PENDING),
    "HERALD_TOKEN_RATE": "0.01",
    "HERALD_TOKEN_BURST": "3",
}
OTHER_ADDRESS = "127.0.0.2"  # another client: loopback answers on all of 127.0.0.0/8


@dataclass
class Herald:
    port: int
    data: Path
    client_id: str
    host_name: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str | None) -> str:
        issuer = LocalIssuer.load_or_create(self.data, "urn:herald:local", "api://herald")
        return issuer.mint(client_id=self.client_id, user_id=user)


@pytest.fixture(scope="module")
def herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Herald]:
    data = tmp_path_factory.mktemp("herald-connections")
    host_name = f"conn-{uuid.uuid4().hex[:8]}.example.com"
    client_id = register(data, None, host_name)
    port = free_port()
    proc = start(data, port, None, **SETTINGS)
    try:
        yield Herald(port, data, client_id, host_name)
    finally:
        proc.terminate()
        proc.wait(10)


# -- raw sockets --------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: closed without a response
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the last byte sent to the connection's end (EOF)

    @property
    def error(self) -> dict[str, Any]:
        return dict(json.loads(self.body)["error"])


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    return sock


def read_to_end(sock: socket.socket) -> Answer:
    """Everything until the server closes the connection, parsed as one response."""
    start = time.monotonic()
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except ConnectionResetError:
        pass
    return parse(raw, time.monotonic() - start)


def parse(raw: bytes, seconds: float) -> Answer:
    if not raw:
        return Answer(None, {}, b"", seconds)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return Answer(int(lines[0].split()[1]), headers, body, seconds)


def healthz_seconds(port: int, source: str = "127.0.0.1") -> float:
    start = time.monotonic()
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as c:
        assert c.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    return time.monotonic() - start


def assert_refused(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "application/json"
    assert answer.error["code"] == code and answer.error["innerError"]["request-id"]


# -- sizes --------------------------------------------------------------------------------------

WS_HEAD = (
    b"GET /beta/me/notificationSubscriptions/x/stream HTTP/1.1\r\nHost: h\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
ENDLESS = {
    # (what comes first, what repeats for ever)
    "many headers": (b"GET /healthz HTTP/1.1\r\nHost: h\r\n", b"X-Filler: " + b"a" * 90 + b"\r\n"),
    "one endless header": (b"GET /healthz HTTP/1.1\r\nHost: h\r\nX-Filler: ", b"a" * 100),
    "endless URL": (b"GET /healthz?", b"a" * 100),
    "WebSocket handshake": (WS_HEAD, b"X-Filler: " + b"a" * 90 + b"\r\n"),
}


@pytest.mark.parametrize("shape", ENDLESS)
def test_an_endless_request_head_is_refused_and_closed(herald: Herald, shape: str) -> None:
    """The client sends its head for ever (up to 16 MB here): Herald answers 431 (414 for the
    URL) once it passes the limit, and closes; meanwhile another client is served at once."""
    first, filler = ENDLESS[shape]

    async def attack() -> tuple[Answer, list[float]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", herald.port)
        raw = b""

        async def send() -> None:
            writer.write(first)
            chunk, sent = filler * 100, 0
            with contextlib.suppress(OSError):
                while sent < 16_000_000 and not raw:  # until the server answers
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)

        async def others() -> list[float]:
            return [await asyncio.to_thread(healthz_seconds, herald.port) for _ in range(5)]

        sender = asyncio.create_task(send())
        checks = asyncio.create_task(others())
        start = time.monotonic()
        with contextlib.suppress(OSError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    raw += chunk
        seconds = time.monotonic() - start
        sender.cancel()
        writer.close()
        return parse(raw, seconds), await checks

    answer, others = asyncio.run(attack())
    if shape == "endless URL":
        assert_refused(answer, 414, "requestUriTooLong")
    else:
        assert_refused(answer, 431, "requestHeaderFieldsTooLarge")
    assert max(others) < 1.0, others


def test_a_long_url_in_a_complete_request_is_refused(herald: Herald) -> None:
    with connect(herald.port) as sock:
        sock.sendall(b"GET /healthz?" + b"a" * MAX_URL + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert_refused(read_to_end(sock), 414, "requestUriTooLong")


def test_oversized_headers_in_one_write_are_refused_even_for_a_websocket(herald: Herald) -> None:
    """A complete head over the limit, sent at once (so it is parsed in one piece): 431, for a
    plain request and for a WebSocket handshake (which is not upgraded)."""
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 100) for i in range(MAX_HEAD // 100))
    for first in (b"GET /healthz HTTP/1.1\r\nHost: h\r\n", WS_HEAD):
        with connect(herald.port) as sock:
            sock.sendall(first + filler + b"\r\n")
            assert_refused(read_to_end(sock), 431, "requestHeaderFieldsTooLarge")


def test_heads_and_bodies_within_the_limits_are_served(herald: Herald) -> None:
    """Just under the limits: a URL of MAX_URL bytes and a head of nearly MAX_HEAD, in one write
    with a body that takes the read over the limit (the head alone is measured)."""
    user = f"user-{uuid.uuid4()}"
    body = json.dumps(
        {
            "targetHostName": herald.host_name,
            "payload": {"visualContent": {"title": "t", "body": "x" * 3000}},
        }
    ).encode()
    filler = b"X-Filler: " + b"a" * (MAX_HEAD - 2000) + b"\r\n"
    request = (
        b"POST /beta/users/%s/notifications HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n%s"
        % (user.encode(), herald.token(None).encode(), len(body), filler, body)
    )
    with connect(herald.port) as sock:
        sock.sendall(request)
        answer = read_to_end(sock)
    assert answer.status == 201, answer
    with connect(herald.port) as sock:
        path = b"/healthz?" + b"a" * (MAX_URL - len(b"/healthz?"))
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert read_to_end(sock).status == 200


# -- time ---------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(herald: Herald) -> None:
    with connect(herald.port) as sock:
        answer = read_to_end(sock)
    assert answer.status is None and answer.seconds < TIMEOUT + 1.5, answer


def test_half_a_head_is_answered_408_and_closed(herald: Herald) -> None:
    with connect(herald.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\nX-Half: ")
        answer = read_to_end(sock)
    assert_refused(answer, 408, "requestTimeout")
    assert answer.seconds < TIMEOUT + 1.5, answer


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout(herald: Herald) -> None:
    """Every byte is on time for an idle timeout, but the head as a whole is not."""
    head = b"GET /healthz HTTP/1.1\r\nHost: h\r\n" + b"X-Slow: " + b"a" * 100
    start = time.monotonic()
    with connect(herald.port) as sock:
        for byte in head:  # 6.6 s of bytes, unless the server answers first
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.05)[0]:
                break
        answered = time.monotonic() - start
        answer = read_to_end(sock)
    assert_refused(answer, 408, "requestTimeout")
    assert TIMEOUT - 0.2 < answered < TIMEOUT + 1.5, answered


def test_blank_lines_between_requests_do_not_keep_a_connection_open(herald: Herald) -> None:
    """After a response, a client sending only blank lines (which begin no request, but each
    one cancelled uvicorn's keep-alive timer) is cut at the header timeout."""
    with connect(herald.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - start < 4 * TIMEOUT + 3:
                sock.sendall(b"\r\n")
                if select.select([sock], [], [], 0.2)[0]:
                    break
        closed = time.monotonic() - start
        answer = read_to_end(sock)
    assert_refused(answer, 408, "requestTimeout")
    assert closed < TIMEOUT + 1.5, closed


def test_half_a_body_is_answered_408_and_stores_nothing(herald: Herald) -> None:
    user = f"user-{uuid.uuid4()}"
    body = json.dumps({"payload": {"visualContent": {"title": "never complete"}}}).encode()
    head = (
        b"POST /beta/users/%s/notifications HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (user.encode(), herald.token(None).encode(), len(body))
    )
    with connect(herald.port) as sock:
        sock.sendall(head + body[:10])
        answer = read_to_end(sock)
    assert_refused(answer, 408, "requestTimeout")
    assert answer.seconds < TIMEOUT + 1.5, answer
    me = httpx.get(
        f"{herald.url}/beta/me/notifications",
        headers={"Authorization": f"Bearer {herald.token(user)}"},
    )
    assert me.status_code == 200 and me.json()["value"] == []


def test_an_idle_connection_is_closed_after_the_idle_timeout(herald: Herald) -> None:
    with connect(herald.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = read_to_end(sock)
    assert answer.status == 200 and answer.body.endswith(b'{"status":"ok"}')
    assert TIMEOUT - 0.2 < answer.seconds < TIMEOUT + 1.0, answer


def test_an_idle_connection_outlasts_a_client_keep_alive(tmp_path: Path) -> None:
    """httpx (the Graph SDK's transport) reuses a connection idle for up to its keep-alive expiry
    (5 s). Were Herald's idle timeout as short, it could close a connection just as a request
    goes out on it, and the client would read a reset for a request it cannot tell whether to
    repeat (CI saw one: httpx.ReadError in the middle of a burst of posts). With the default
    settings the client is the one that lets go."""
    expiry = httpx.Limits().keepalive_expiry
    assert expiry is not None
    request = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"
    for server in servers("sqlite", tmp_path):
        with connect(server.settings.port) as sock:
            sock.sendall(request)
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                first += sock.recv(4096)
            time.sleep(expiry + 0.5)  # the client kept it this long, and a little more
            sock.sendall(request)
            again = sock.recv(4096)
        assert again.startswith(b"HTTP/1.1 200"), again


@pytest.mark.parametrize("protocol", ["ws", "sse"])
def test_live_streams_outlive_every_connection_timeout(herald: Herald, protocol: str) -> None:
    """A live stream stays open well past the header, body and idle timeouts (its keep-alives
    are 25 s apart here) and still delivers."""
    user = f"user-{uuid.uuid4()}"
    me = {"Authorization": f"Bearer {herald.token(user)}"}
    backend = {"Authorization": f"Bearer {herald.token(None)}"}
    host_name = herald.host_name
    with httpx.Client(base_url=herald.url, timeout=10) as http:
        sub = http.post(
            "/beta/me/notificationSubscriptions",
            headers=me,
            json={"application": host_name, "platform": "live"},
        )
        assert sub.status_code == 201, sub.text

        async def watch() -> dict[str, Any]:
            async with open_stream(protocol, herald.url, sub.json()["id"], herald.token(user)) as s:
                await asyncio.sleep(3 * TIMEOUT + 0.5)
                posted = await asyncio.to_thread(
                    http.post,
                    f"/beta/users/{user}/notifications",
                    headers=backend,
                    json={
                        "targetHostName": host_name,
                        "payload": {"visualContent": {"title": "still here"}},
                    },
                )
                assert posted.status_code == 201, posted.text
                while True:
                    message = await s.next()
                    if message["type"] == "created":
                        return message

        message = asyncio.run(watch())
    assert message["notification"]["payload"]["visualContent"]["title"] == "still here"


def test_a_websocket_message_over_64_kib_closes_the_stream(herald: Herald) -> None:
    """A live stream takes nothing from the client: a big message (up to 16 MiB by uvicorn's
    default, buffered per connection) ends it with 1009 (message too big)."""
    user = f"user-{uuid.uuid4()}"
    me = {"Authorization": f"Bearer {herald.token(user)}"}
    body = {"application": herald.host_name, "platform": "live"}
    sub = httpx.post(f"{herald.url}/beta/me/notificationSubscriptions", headers=me, json=body)
    assert sub.status_code == 201, sub.text

    async def send_big() -> int | None:
        url = f"ws://127.0.0.1:{herald.port}/beta/me/notificationSubscriptions/"
        async with websockets.connect(
            url + f"{sub.json()['id']}/stream", additional_headers=me, max_size=None
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send("x" * 100_000)
            with contextlib.suppress(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            return ws.close_code

    assert asyncio.run(send_big()) == 1009


def _live_sub(herald: Herald) -> tuple[str, dict[str, str], str]:
    """A user's token header, a live subscription's stream URL, and the user's id."""
    user = f"user-{uuid.uuid4()}"
    me = {"Authorization": f"Bearer {herald.token(user)}"}
    body = {"application": herald.host_name, "platform": "live"}
    sub = httpx.post(f"{herald.url}/beta/me/notificationSubscriptions", headers=me, json=body)
    assert sub.status_code == 201, sub.text
    url = f"ws://127.0.0.1:{herald.port}/beta/me/notificationSubscriptions/{sub.json()['id']}"
    return url + "/stream", me, user


def test_pings_and_fragmented_messages_leave_a_stream_working(herald: Herald) -> None:
    """What a client may send a live stream (herald/websocket.py): a ping is answered with a
    pong, a message in fragments is taken (and ignored), and the stream still delivers."""
    url, me, user = _live_sub(herald)

    async def talk() -> dict[str, Any]:
        async with websockets.connect(url, additional_headers=me) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            async with asyncio.timeout(5):
                await (await ws.ping(b"are you there"))  # the pong came
            await ws.send(iter(["frag", "mented"]))
            await ws.send(iter([b"bin", b"ary"]))
            async with asyncio.timeout(5):
                await (await ws.ping())
            posted = await asyncio.to_thread(
                httpx.post,
                f"{herald.url}/beta/users/{user}/notifications",
                headers={"Authorization": f"Bearer {herald.token(None)}"},
                json={
                    "targetHostName": herald.host_name,
                    "payload": {"visualContent": {"title": "after the chatter"}},
                },
            )
            assert posted.status_code == 201, posted.text
            async with asyncio.timeout(5):
                while True:
                    message: dict[str, Any] = json.loads(await ws.recv())
                    if message["type"] == "created":
                        return message

    message = asyncio.run(talk())
    assert message["notification"]["payload"]["visualContent"]["title"] == "after the chatter"


def test_invalid_utf8_text_closes_the_stream_with_1007(herald: Herald) -> None:
    url, me, _ = _live_sub(herald)

    async def send_garbage() -> int | None:
        async with websockets.connect(url, additional_headers=me) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(b"\xff\xfe not UTF-8", text=True)
            with contextlib.suppress(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            return ws.close_code

    assert asyncio.run(send_garbage()) == 1007


def test_a_client_close_ends_the_stream_with_its_code(herald: Herald) -> None:
    """The client closes with a code: the server answers the closing handshake with it, and the
    stream is gone from the open streams (the metrics gauge)."""
    url, me, _ = _live_sub(herald)

    async def close() -> tuple[int | None, int | None]:
        async with websockets.connect(url, additional_headers=me) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.close(4000, "bye")
            rcvd = ws.protocol.close_rcvd  # the server's answering close frame
            return ws.close_code, rcvd.code if rcvd else None

    assert asyncio.run(close()) == (4000, 4000)
    deadline = time.monotonic() + 5
    while _streams_open(herald) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _streams_open(herald) == 0


def _streams_open(herald: Herald) -> float:
    text = httpx.get(f"{herald.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("herald_live_streams{")
    )


# -- per address --------------------------------------------------------------------------------


def test_waiting_connections_per_address_are_bounded(herald: Herald) -> None:
    """PENDING connections from one address that sent nothing are held (until the header
    timeout); one more is answered 429 with Retry-After at once. Another address is not
    affected, and a connection that has sent its head no longer counts."""
    waiting = [connect(herald.port) for _ in range(PENDING)]
    try:
        time.sleep(0.2)
        with connect(herald.port) as extra:
            answer = read_to_end(extra)
        assert_refused(answer, 429, "activityLimitReached")
        assert int(answer.headers["retry-after"]) >= 1 and answer.seconds < 0.5
        assert healthz_seconds(herald.port, OTHER_ADDRESS) < 1.0
        # One of them sends a request: its place is free again.
        waiting[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert waiting[0].recv(65536).startswith(b"HTTP/1.1 200")
        assert healthz_seconds(herald.port) < 1.0
    finally:
        for sock in waiting:
            sock.close()


def test_idle_sockets_from_one_address_do_not_starve_another(tmp_path: Path) -> None:
    """The reported outage: with a low open-files limit, 600 idle unauthenticated sockets from
    one address left other clients unanswered. Herald raises its soft limit to the hard one
    (and says so), and bounds the waiting connections per address, so a client on another
    address gets every answer."""
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, **SETTINGS, "HERALD_MAX_PENDING_PER_ADDRESS": "32"}
    env["HERALD_LOG_FORMAT"] = "json"
    args = [sys.executable, "-m", "herald", "serve", "--data", str(tmp_path), "--port", str(port)]

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))

    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=out, preexec_fn=low_limit)
    idle: list[socket.socket] = []
    try:
        _wait_ready(port, proc, log)
        for _ in range(600):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            idle.append(sock)
        time.sleep(0.5)
        answered = 0
        transport = httpx.HTTPTransport(local_address=OTHER_ADDRESS)
        with httpx.Client(transport=transport, timeout=3) as client:
            for _ in range(20):
                try:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        answered += 1
                except httpx.TransportError:
                    pass
        assert answered == 20, f"{answered} of 20 answered"
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    raised = [line for line in lines if line["message"] == "raised the open files limit"]
    assert raised and raised[0]["from"] == 128 and raised[0]["to"] == 256, lines[:5]


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    raise RuntimeError("herald serve did not become ready")


# -- forwarded addresses ------------------------------------------------------------------------


def _token_attempts(url: str, forwarded: list[str | None], source: str = "127.0.0.1") -> list[int]:
    """Token requests with a client that does not exist (refused quickly, 401), each with the
    given X-Forwarded-For; their statuses (429 once the address's bucket is empty)."""
    statuses = []
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        for address in forwarded:
            headers = {"X-Forwarded-For": address} if address else {}
            r = client.post(
                f"{url}/oauth2/v2.0/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": "nobody",
                    "client_secret": "wrong",
                },
                headers=headers,
            )
            statuses.append(r.status_code)
    return statuses


def test_forged_forwarded_addresses_do_not_dodge_the_token_limit(herald: Herald) -> None:
    """No proxy is configured: X-Forwarded-For from 127.0.0.1 (which uvicorn trusts by default)
    is ignored, so rotating it does not give each request a fresh bucket (burst 3)."""
    rotating: list[str | None] = [f"203.0.113.{i}" for i in range(8)]
    statuses = _token_attempts(herald.url, rotating)
    assert statuses[:3] == [401, 401, 401] and set(statuses[3:]) == {429}, statuses


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Herald behind a proxy on 127.0.0.1 (burst 3 per client address)."""
    data = tmp_path_factory.mktemp("herald-proxied")
    settings = {"trusted_proxies": "127.0.0.1", "token_rate": 0.01, "token_burst": 3}
    for server in servers("sqlite", data, **settings):
        yield server.base_url


def test_a_trusted_proxy_forwards_client_addresses(proxied: str) -> None:
    """From the configured proxy, X-Forwarded-For names the client: each client has its own
    bucket; from any other address the header is ignored."""
    clients: list[str | None] = [f"198.51.100.{i}" for i in range(6)]
    assert _token_attempts(proxied, clients) == [401] * 6
    one: list[str | None] = ["198.51.100.77"] * 5
    assert _token_attempts(proxied, one) == [401, 401, 401, 429, 429]
    rotating: list[str | None] = [f"192.0.2.{i}" for i in range(5)]
    assert _token_attempts(proxied, rotating, source=OTHER_ADDRESS) == [401, 401, 401, 429, 429]
