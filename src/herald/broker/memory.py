"""The in-process broker: a dict from (user, app) to the listeners on this node."""

from __future__ import annotations

import logging

from herald.broker.base import Listener
from herald.model import Change

log = logging.getLogger("herald.broker")


class MemoryBroker:
    def __init__(self) -> None:
        self.topics: dict[tuple[str, str], list[Listener]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.topics.clear()

    def listen(self, user_id: str, app: str, listener: Listener) -> None:
        self.topics.setdefault((user_id, app), []).append(listener)

    def unlisten(self, user_id: str, app: str, listener: Listener) -> None:
        listeners = self.topics.get((user_id, app))
        if listeners is None:
            return
        try:
            listeners.remove(listener)
        except ValueError:
            return
        if not listeners:
            del self.topics[(user_id, app)]

    async def publish(self, change: Change) -> None:
        # A copy: a listener may unlisten while we iterate (it closes on delivery).
        for listener in tuple(self.topics.get((change.user_id, change.app), ())):
            try:
                listener.deliver(change)
            except Exception:  # one broken stream must not starve the others
                log.exception("listener failed", extra={"user": change.user_id})

    async def revoke(self, user_id: str, app: str, subscription_id: str) -> None:
        for listener in tuple(self.topics.get((user_id, app), ())):
            listener.revoke(subscription_id)

    def listeners(self) -> int:
        return sum(len(v) for v in self.topics.values())
