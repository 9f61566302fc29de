"""A webhook receiver for the tests: an HTTP server on 127.0.0.1 that records every POST and
answers each as planned: a status; "hang", no answer until after Herald's timeout; or a float,
the seconds to hold the request before answering 200 (Herald may be killed meanwhile). Only
answers that were ints below 300 count as accepted."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG = "hang"


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # monotonic
    answer: int | str | float

    @property
    def events(self) -> list[dict[str, Any]]:
        changes: list[dict[str, Any]] = json.loads(self.body)["data"]["changes"]
        return changes


class Receiver:
    def __init__(self, hang: float = 2.0) -> None:
        self.plan: list[int | str | float] = []  # answers for the next POSTs, in order; then 200
        self.received: list[Received] = []
        self.hang = hang
        self.changed = threading.Condition()
        self.path = f"/hook/{uuid.uuid4()}"
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path != receiver.path:  # a webhook of an earlier receiver on this port
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with receiver.changed:
                    answer = receiver.plan.pop(0) if receiver.plan else 200
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Received(headers, body, time.monotonic(), answer))
                    receiver.changed.notify_all()
                if answer == HANG:
                    time.sleep(receiver.hang)
                    answer = 200
                elif isinstance(answer, float):
                    time.sleep(answer)
                    answer = 200
                assert isinstance(answer, int)
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"

    def wait(self, done: Callable[[list[Received]], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done(self.received):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; received {len(self.received)} POSTs"
                self.changed.wait(left)

    def accepted(self) -> list[Received]:
        """The POSTs answered with a 2xx."""
        with self.changed:
            return [r for r in self.received if type(r.answer) is int and r.answer < 300]

    def events(self) -> list[dict[str, Any]]:
        """Each event once (by its id), in the order first accepted: a receiver's de-duplication
        (delivery is at least once)."""
        seen: dict[str, dict[str, Any]] = {}
        for r in self.accepted():
            for e in r.events:
                seen.setdefault(e["id"], e)
        return list(seen.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def receiver(hang: float = 2.0) -> Iterator[Receiver]:
    r = Receiver(hang)
    try:
        yield r
    finally:
        r.close()
