"""The httpx clients (APNs over HTTP/2, FCM's OAuth token requests): like Herald's HTTP/1.1
client they keep no cookie a service sets, so nothing of one answer rides on later requests."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from herald.outbound.providers.clients import client, sync_client
from tests.standins import TlsFiles, make_tls

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: track=me; Path=/; Max-Age=3600\r\n\r\nok"
)


class CookieSetter:
    """An HTTPS server on localhost (HTTP/1.1) answering every request with a Set-Cookie, and
    recording each request's head."""

    def __init__(self, tls: TlsFiles) -> None:
        self.heads: list[bytes] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=context)
        )
        self.url = f"https://localhost:{self.server.sockets[0].getsockname()[1]}/token"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ]
                await reader.readexactly(length[0] if length else 0)
                self.heads.append(head.lower())
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def setter(tmp_path: Path) -> Iterator[CookieSetter]:
    s = CookieSetter(make_tls(tmp_path))
    yield s
    s.close()


def test_the_apns_client_keeps_no_cookie(setter: CookieSetter, tmp_path: Path) -> None:
    async def twice() -> None:
        async with client(str(tmp_path / "standin-ca.pem"), 5.0, http2=True) as http:
            for _ in range(2):
                assert (await http.post(setter.url, content=b"{}")).status_code == 200

    asyncio.run(twice())
    assert len(setter.heads) == 2 and all(b"cookie:" not in h for h in setter.heads)


def test_the_oauth_client_keeps_no_cookie(setter: CookieSetter, tmp_path: Path) -> None:
    with sync_client(str(tmp_path / "standin-ca.pem"), 5.0) as http:
        for _ in range(2):
            assert http.post(setter.url, data={"grant_type": "x"}).status_code == 200
    assert len(setter.heads) == 2 and all(b"cookie:" not in h for h in setter.heads)
