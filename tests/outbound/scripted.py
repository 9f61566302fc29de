"""A scripted HTTP/1.1 server on 127.0.0.1 for the outbound clients' tests: it reads each request
whole, records it, and answers it as scripted (over TLS if given a context)."""

from __future__ import annotations

import asyncio
import ssl

# What the server does with one request: the bytes of its answer (the connection is closed after
# one that says "Connection: close"), or None to close the connection without answering.
Script = bytes | None
CREATED = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nLocation: /m/1\r\n\r\n"


class Scripted:
    """Reads each request whole and answers it with the next script (then `then`)."""

    def __init__(self, *scripts: Script, then: bytes = CREATED) -> None:
        self.scripts = list(scripts)
        self.then = then  # the answer once the scripts are used up
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self.server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> str:
        """Listen on 127.0.0.1; the URL to reach it by `host`."""
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://{host}:{port}/push/a?b=1"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.scripts.pop(0) if self.scripts else self.then
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    return
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
