"""What Herald's connection limits (src/herald/connections.py) cost per request.

Requests are fed to the protocol in process, over one keep-alive connection with an in-memory
transport: uvicorn's own httptools protocol, then Herald's `Connection` (the same protocol with
head size limits, header/body deadlines and the pending-connections bound), alternately,
`--rounds` times. Each request is a notification POST as ingest.py sends it (a 700-byte bearer
token, a JSON body), answered 201 by a minimal ASGI app, so what is measured is the protocol's
parsing, its callbacks, the request task and the response: the part of a request this change
touches, without the network or a store. CPU time (process time), not wall time: other load on
a shared machine moves the figures much less.

Prints µs per request for each (minimum and median over the rounds) and the difference.

Usage: .venv/bin/python benchmarks/connections.py [--rounds 15] [--requests 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from herald.connections import protocol
from herald.settings import Settings

BODY = b'{"targetHostName":"bench.example.com","payload":{"visualContent":{"title":"Hello"}}}'
REQUEST = (
    b"POST /beta/me/notifications HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Authorization: Bearer " + b"x" * 700 + b"\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


class Transport:
    """Enough of an asyncio transport for the protocol: writes go nowhere."""

    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def per_request(cls: type[Any], requests: int) -> float:
    """CPU µs per request through one connection of protocol class `cls`."""
    config = Config(app=app, http=cls, lifespan="off", access_log=False, log_level="warning")
    config.load()
    connection = cls(config=config, server_state=ServerState(), app_state={})
    connection.connection_made(Transport())

    async def serve(n: int) -> None:
        for _ in range(n):
            connection.data_received(REQUEST)
            await asyncio.sleep(0)  # the request task runs and answers
            await asyncio.sleep(0)

    await serve(1000)  # warm-up
    gc.collect()
    start = time.process_time()
    await serve(requests)
    return (time.process_time() - start) / requests * 1e6


async def measure(rounds: int, requests: int) -> dict[str, list[float]]:
    kinds = {"uvicorn": HttpToolsProtocol, "herald": protocol(Settings())}
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, cls in kinds.items():
            results[name].append(await per_request(cls, requests))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests per round (10,000)")
    args = ap.parse_args()
    results = uvloop.run(measure(args.rounds, args.requests))
    for name, values in results.items():
        print(f"{name:8} min {min(values):6.2f} µs/req  median {statistics.median(values):6.2f}")
    low = min(results["herald"]) - min(results["uvicorn"])
    mid = statistics.median(results["herald"]) - statistics.median(results["uvicorn"])
    print(f"Herald's limits cost {low:+.2f} µs per request (minimum), {mid:+.2f} µs (median)")


if __name__ == "__main__":
    main()
