"""The httpx clients (APNs over HTTP/2, FCM's OAuth token requests): like Herald's HTTP/1.1
client they keep no cookie a service sets, so nothing of one answer rides on later requests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from herald.outbound.providers.clients import client, sync_client
from tests.outbound.scripted import Scripted
from tests.standins import make_tls

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: track=me; Path=/; Max-Age=3600\r\n\r\nok"
)


def twice_on_localhost(tmp_path: Path, post: Callable[[str, str], Awaitable[None]]) -> list[bytes]:
    """Start an HTTPS server on localhost that sets a cookie on every answer; `post(url, ca)`
    (a coroutine function) makes two requests; the requests the server read."""
    tls = make_tls(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)

    async def main() -> list[bytes]:
        server = Scripted(then=ANSWER)
        url = await server.start(context, host="localhost")
        try:
            await post(url, str(tls.ca_file))
        finally:
            await server.stop()
        return server.requests

    return asyncio.run(main())


def test_the_apns_client_keeps_no_cookie(tmp_path: Path) -> None:
    async def post(url: str, ca: str) -> None:
        async with client(ca, 5.0, http2=True) as http:
            for _ in range(2):
                assert (await http.post(url, content=b"{}")).status_code == 200

    requests = twice_on_localhost(tmp_path, post)
    assert len(requests) == 2 and all(b"cookie:" not in r.lower() for r in requests)


def test_the_oauth_client_keeps_no_cookie(tmp_path: Path) -> None:
    def post_blocking(url: str, ca: str) -> None:
        with sync_client(ca, 5.0) as http:
            for _ in range(2):
                assert http.post(url, data={"grant_type": "x"}).status_code == 200

    async def post(url: str, ca: str) -> None:
        await asyncio.to_thread(post_blocking, url, ca)  # the server runs on this loop

    requests = twice_on_localhost(tmp_path, post)
    assert len(requests) == 2 and all(b"cookie:" not in r.lower() for r in requests)
