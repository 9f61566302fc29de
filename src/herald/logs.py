"""Structured logging: one JSON object per line (or plain text for people), with repeated
warnings and errors limited (`Repeats`) so a failing disk or database cannot flood the log."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
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


Kind = tuple[str, int, str, str | None]
MAX_KINDS = 1000  # beyond this many kinds in one window, lines are told apart by template only


class _Window:
    __slots__ = ("lines", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.lines = 0
        self.suppressed = 0


class Repeats(logging.Filter):
    """Lets the first `limit` warning and error lines of each kind through per `window` seconds
    and counts the rest; when the window is over, one line of that kind says how many were
    suppressed ("suppressed 1234 similar lines", field `suppressed`). A kind is the logger, the
    level, the message template and the error reported (the `error` field, or the exception's
    type and text), so the first line of each distinct error always gets through. Lower levels
    pass untouched. Counters (metrics) are not logs: they still count every event."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.limit = limit
        self.window = window
        self.clock = clock
        self.kinds: dict[Kind, _Window] = {}
        self.next_scan = 0.0
        self.lock = threading.Lock()  # handlers filter outside their own lock

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not self.limit or hasattr(record, "suppressed"):
            return True
        now = self.clock()
        kind = _kind(record)
        with self.lock:
            finished = self._finished(now)
            window = self.kinds.get(kind)
            if window is None:
                if len(self.kinds) >= MAX_KINDS:
                    kind = (*kind[:3], None)
                window = self.kinds.setdefault(kind, _Window(now))
            window.lines += 1
            passed = window.lines <= self.limit
            if not passed:
                window.suppressed += 1
        _report(finished)  # outside the lock: these lines come through this filter too
        return passed

    def flush(self, force: bool = False) -> None:
        """Report the windows that are over (all of them if `force`)."""
        with self.lock:
            finished = self._finished(self.clock(), force)
        _report(finished)

    def _finished(self, now: float, force: bool = False) -> list[tuple[Kind, int]]:
        if not force:
            if now < self.next_scan:
                return []
            self.next_scan = now + self.window / 4
        over = [k for k, w in self.kinds.items() if force or now - w.start >= self.window]
        return [(k, w.suppressed) for k in over if (w := self.kinds.pop(k)).suppressed]


def _kind(record: logging.LogRecord) -> Kind:
    error = getattr(record, "error", None)
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        error = f"{type(exc).__name__}: {exc}"
    return (
        record.name,
        record.levelno,
        str(record.msg),
        None if error is None else str(error)[:200],
    )


def _report(finished: list[tuple[Kind, int]]) -> None:
    for (name, level, message, error), count in finished:
        logging.getLogger(name).log(
            level,
            "suppressed %d similar lines: %s",
            count,
            message,
            extra={"suppressed": count, "suppressed_message": message, "suppressed_error": error},
        )


def repeats_filters() -> list[Repeats]:
    return [f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, Repeats)]


async def report_repeats(interval: float = 1.0) -> None:
    """Report finished windows even when no further line comes to trigger it (a task)."""
    try:
        while True:
            await asyncio.sleep(interval)
            for repeats in repeats_filters():
                repeats.flush()
    finally:
        for repeats in repeats_filters():
            repeats.flush(force=True)


def configure(
    level: str = "info", fmt: str = "json", repeats: int = 0, repeat_window: float = 10.0
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if repeats:
        handler.addFilter(Repeats(repeats, repeat_window))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
