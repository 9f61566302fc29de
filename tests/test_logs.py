"""Structured logs: one JSON object per line, with the fields a caller passes in `extra`."""

from __future__ import annotations

import json
import logging

import pytest

from herald.logs import JsonFormatter, redact_tokens


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
