"""`herald serve` as a real subprocess, for tests that kill it (SIGKILL, SIGTERM) and restart it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

UNLIMITED = {
    "HERALD_APP_RATE": "1000000",
    "HERALD_APP_BURST": "1000000",
    "HERALD_USER_RATE": "1000000",
    "HERALD_USER_BURST": "1000000",
}


def start(data: Path, port: int, store_url: str | None, **env: str) -> subprocess.Popen[bytes]:
    """Start `herald serve` on `data` (rate limits lifted, `env` added); wait for /readyz."""
    environment = {**os.environ, **UNLIMITED, **env}
    args = [sys.executable, "-m", "herald", "serve", "--data", str(data), "--port", str(port)]
    if store_url:
        args += ["--store", store_url]
    with (data / "server.log").open("ab") as log:  # a file, not a pipe: a full pipe blocks
        proc = subprocess.Popen(args, env=environment, stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((data / "server.log").read_text())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("herald serve did not become ready")


def register(data: Path, store_url: str | None, host_name: str) -> str:
    """`herald app create` on the same data and store; the new app's client id."""
    args = [sys.executable, "-m", "herald", "app", "create", "--host-name", host_name]
    args += ["--data", str(data)] + (["--store", store_url] if store_url else [])
    out = subprocess.run(args, check=True, capture_output=True).stdout
    return str(json.loads(out)["clientId"])
