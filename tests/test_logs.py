"""Structured logs: one JSON object per line, with the fields a caller passes in `extra`."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herald.auth.issuer import LocalIssuer
from herald.logs import JsonFormatter, Repeats, redact_tokens
from tests.conftest import free_port
from tests.processes import register, start


def test_json_lines_carry_extra_fields_and_exceptions() -> None:
    record = logging.makeLogRecord(
        {"name": "herald.api", "levelname": "ERROR", "msg": "failed %s", "args": ("x",)}
    )
    record.code = "generalException"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed x" and line["level"] == "error"
    assert line["logger"] == "herald.api" and line["code"] == "generalException"
    assert "ValueError: boom" in line["exception"]


def test_access_tokens_in_logged_urls_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    redact_tokens()
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        logger.info('%s - "WebSocket %s" [accepted]', "1.2.3.4", "/s?after=3&access_token=ey.J.x")
        logger.info("GET /s?access_token=secret-token HTTP/1.1")
        logger.info('"WebSocket %s" 400', "/beta/x/stream?access%5Ftoken=other-secret")
    text = caplog.text
    assert "ey.J.x" not in text and "secret-token" not in text and "other-secret" not in text
    assert '"WebSocket /s?***" [accepted]' in text and "GET /s?*** HTTP/1.1" in text
    assert '"WebSocket /beta/x/stream?***" 400' in text


def test_a_refused_websocket_handshake_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redact_tokens()
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        logger.error("ASGI callable returned without completing handshake.")
        logger.error("Exception in ASGI application\n")
    assert [r.getMessage() for r in caplog.records] == ["Exception in ASGI application\n"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_repeats_let_each_distinct_error_through_and_count_the_rest() -> None:
    """3 lines per 10 s window per kind: a flood of one error does not hide the first line of
    another; info lines are never limited; each window's suppressed lines are reported once."""
    now = [0.0]
    handler = _Collect()
    handler.addFilter(Repeats(3, 10.0, clock=lambda: now[0]))
    logger = logging.getLogger("herald.test-repeats")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for _ in range(100):
            logger.error("request failed", extra={"error": "disk is full"})
        logger.error("request failed", extra={"error": "connection refused"})
        try:
            raise OSError("boom")
        except OSError:
            for _ in range(5):
                logger.exception("unhandled error")
        for _ in range(5):
            logger.info("issued a token")
        now[0] = 10.5
        logger.error("request failed", extra={"error": "disk is full"})
    finally:
        logger.removeHandler(handler)
    shown = [(r.getMessage(), getattr(r, "error", None)) for r in handler.records]
    assert shown == [
        ("request failed", "disk is full"),
        ("request failed", "disk is full"),
        ("request failed", "disk is full"),
        ("request failed", "connection refused"),
        ("unhandled error", None),
        ("unhandled error", None),
        ("unhandled error", None),
        ("issued a token", None),
        ("issued a token", None),
        ("issued a token", None),
        ("issued a token", None),
        ("issued a token", None),
        ("suppressed 97 similar lines: request failed", None),
        ("suppressed 2 similar lines: unhandled error", None),
        ("request failed", "disk is full"),
    ]
    summary = handler.records[-3]
    assert summary.levelno == logging.ERROR and summary.suppressed == 97  # type: ignore[attr-defined]
    assert summary.suppressed_error == "disk is full"  # type: ignore[attr-defined]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at `path` (needs root, as the suite runs in CI), for a full disk."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> None:
    with (directory / "filler").open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def test_a_full_disk_logs_each_error_once_per_window_and_counts_every_one(
    tmp_path: Path,
) -> None:
    """`herald serve` with its SQLite database on a full disk answers every post 503. Its log
    (stderr) has at most 5 "request failed" lines per 1 s window, then one line saying how many
    were suppressed; lines and suppressed counts add up to the 503s the client got, and so does
    the metric."""
    host = f"full-{uuid.uuid4().hex[:8]}.example.com"
    with tmpfs(tmp_path / "store", "4m") as store:
        store_url = f"sqlite:///{store / 'herald.db'}"
        client_id = register(tmp_path, store_url, host)
        port = free_port()
        env = {"HERALD_LOG_REPEATS": "5", "HERALD_LOG_REPEAT_WINDOW": "1"}
        proc = start(tmp_path, port, store_url, **env)
        try:
            issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
            token = issuer.mint(client_id=client_id, user_id="full-disk-user")
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
                body = {"targetHostName": host, "payload": {"rawContent": "x" * 1000}}
                assert c.post("/beta/me/notifications", json=body).status_code == 201
                fill(store)
                for _ in range(2000):  # until the free pages of the write-ahead log are used up
                    if c.post("/beta/me/notifications", json=body).status_code == 503:
                        break
                started, failed = time.monotonic(), 1
                while time.monotonic() - started < 3.0:
                    r = c.post("/beta/me/notifications", json=body)
                    assert r.status_code in (201, 503), r.text
                    failed += r.status_code == 503
                metric = _errors_counted(c.get("/metrics").text)

                def accounted() -> tuple[int, int, list[dict[str, Any]]]:
                    lines = _json_lines(tmp_path / "server.log")
                    shown = [x for x in lines if x["message"] == "request failed"]
                    summaries = [
                        x for x in lines if x.get("suppressed_message") == "request failed"
                    ]
                    return len(shown), sum(x["suppressed"] for x in summaries), summaries

                deadline = time.monotonic() + 5
                while sum(accounted()[:2]) < failed and time.monotonic() < deadline:
                    time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(10)
    shown, suppressed, summaries = accounted()
    assert metric == failed > 500, (metric, failed)
    assert shown + suppressed == failed, (shown, suppressed, failed)
    assert 5 <= shown <= 5 * 6, shown  # 3 s of errors: a few windows of 5 lines
    assert summaries and all(
        x["level"] == "error" and "disk is full" in x["suppressed_error"] for x in summaries
    )


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


def _errors_counted(metrics: str) -> int:
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "herald_http_requests_total" and sample.labels["status"] >= "500":
                total += sample.value
    return int(total)
