"""A private redis-server for tests: started on a free port in a temp dir, stopped afterwards.

Tests kill it (SIGKILL, then start it again on the same port), freeze it (SIGSTOP/SIGCONT) and
cut its pub/sub clients (CLIENT KILL TYPE pubsub). A missing redis-server binary is a failure,
not a skip: the Redis broker's tests must run wherever the suite runs (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class RedisServer:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)]
        args += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        with (self.root / "redis.log").open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command("PING") == b"+PONG":
                return
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "redis.log").read_text())
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: every connection drops, every subscription and queued message is gone."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open (the kernel even accepts new ones) and nothing is
        answered: a silent subscription."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def command(self, *words: str) -> bytes | None:
        """One inline command on a fresh connection; its first reply line, None if refused."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall((" ".join(words) + "\r\n").encode())
                return s.recv(65536).split(b"\r\n", 1)[0]
        except OSError:
            return None

    def close(self) -> None:
        if self.proc is not None:
            if self.stopped:
                self.thaw()
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def redis_server() -> Iterator[RedisServer]:
    from tests.conftest import free_port

    root = Path(tempfile.mkdtemp(prefix="herald-redis-"))
    server = RedisServer(root, free_port())
    try:
        server.start()
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)
