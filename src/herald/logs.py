"""Structured logging: one JSON object per line (or plain text for people)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import msgspec

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Browsers pass the access token in the query string of live streams (docs/devices.md), and
# uvicorn logs WebSocket paths with their query: never let a query string reach a log (a token
# can be spelled in more ways than a pattern for `access_token=` would catch).
_QUERY = re.compile(r"(/[^\s?\"']*)\?[^\s\"']*")


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _QUERY.sub(r"\1?***", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = _QUERY.sub(r"\1?***", record.msg)
        return True


class QuietRefusals(logging.Filter):
    """uvicorn (websockets-sansio) logs an error for every WebSocket handshake refused with an
    HTTP response (`websocket.http.response`, how a live stream answers a bad token), as if the
    app had forgotten to answer; it did answer. Drop that one line, not real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing handshake."


def redact_tokens() -> None:
    """Install the filters on the loggers that see request URLs (idempotent)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for kind in (RedactTokens, QuietRefusals):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
    # httpx logs every request's URL at INFO: push endpoints and WNS channel URIs are secrets
    # (whoever has one can push to the device), so only its warnings get through.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(data, enc_hook=str).decode()


def configure(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
