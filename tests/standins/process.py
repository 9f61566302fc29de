"""Start a stand-in as a subprocess (`python -m tests.standins`) and talk to it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.standins.control import ControlClient

REPO = Path(__file__).resolve().parents[2]


class Spawned:
    """A stand-in process: its info (url, ca_file, control, credentials) and control API."""

    def __init__(self, process: subprocess.Popen[bytes], info: dict[str, Any]) -> None:
        self.process = process
        self.info = info

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def ca_file(self) -> Path:
        return Path(self.info["ca_file"])

    def control(self) -> ControlClient:
        """A new control client (close it)."""
        return ControlClient(self.url, self.ca_file)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def spawn(
    provider: str,
    directory: Path | str,
    *,
    port: int = 0,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> Spawned:
    """Start `python -m tests.standins PROVIDER --port PORT --dir DIRECTORY ARGS`; its output goes
    to DIRECTORY/PROVIDER.log. Returns once it listens (its info file is written)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    info_file = root / f"{provider}.json"
    info_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "tests.standins", provider]
    command += ["--port", str(port), "--dir", str(root), *args]
    with (root / f"{provider}.log").open("ab") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while not info_file.exists():
        if process.poll() is not None:
            raise RuntimeError((root / f"{provider}.log").read_text())
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"the {provider} stand-in did not start within {timeout}s")
        time.sleep(0.05)
    return Spawned(process, json.loads(info_file.read_text()))
