"""A clock tests move forward: Herald's injected clock (`build_services(..., clock=)`), so a test
of something due later (a fallback push, the end of quiet hours) needs no sleep."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
