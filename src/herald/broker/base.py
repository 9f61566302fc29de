"""The Broker protocol: publish a user's changes of one app to the streams listening for them."""

from __future__ import annotations

from typing import Protocol

from herald.model import Change


class Listener(Protocol):
    def deliver(self, change: Change) -> None:
        """Take one change. Called on the event loop; must not block or raise."""

    def revoke(self, subscription_id: str) -> None:
        """The subscription `subscription_id` was deleted: a stream serving it closes."""


class Broker(Protocol):
    """Guarantees:

    * A change published for (user, app) reaches every listener registered for that pair before
      the publish, once, and in publish order. A listener never sees another pair's changes.
    * No storage: a listener that was not registered misses the change. Streams close that gap
      by registering first and then replaying the change log (see `api/stream.py`).
    * `publish` never waits for a slow listener; listeners buffer for themselves.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def listen(self, user_id: str, app: str, listener: Listener) -> None: ...

    def unlisten(self, user_id: str, app: str, listener: Listener) -> None:
        """Stop delivering to `listener`; unknown listeners are ignored."""

    async def publish(self, change: Change) -> None:
        """Deliver `change` to the listeners of (change.user_id, change.app)."""

    async def revoke(self, user_id: str, app: str, subscription_id: str) -> None:
        """Tell the listeners of (user, app) that this subscription is gone."""
