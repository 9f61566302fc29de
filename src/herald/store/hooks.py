"""The commit signal of a store (`Outbox.on_commit`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("herald.store")


class CommitHooks:
    """The `on_commit` callbacks of a store, called on the event loop after a commit that added
    outbox entries (or another signal's: `name`)."""

    def __init__(self, name: str = "on_commit") -> None:
        self._name = name
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def fire(self) -> None:
        # A failing callback must not fail the writer (its batch has committed) nor the others.
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("%s callback failed", self._name)
