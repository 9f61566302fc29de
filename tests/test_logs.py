"""Structured logs: one JSON object per line, with the fields a caller passes in `extra`."""

from __future__ import annotations

import json
import logging

from herald.logs import JsonFormatter


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
