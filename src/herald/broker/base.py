"""The Broker protocol: publish a user's changes of one app to the streams listening for them."""

from __future__ import annotations

from typing import Protocol

from herald.model import Change


class Listener(Protocol):
    @property
    def sent(self) -> int:
        """The listener's position: it has every change of its (user, app) up to here (from its
        own replay of the change log, or delivered) and drops any delivery at or below it. When
        it calls `listen`, it is the position it resumes from, never past the user's newest
        position then. A broker that fills gaps (`broker/cursor.py`) fills from the lowest of
        its listeners' positions, and skips a listener whose position is at or past a change."""

    def deliver(self, change: Change) -> None:
        """Take one change. Called on the event loop; must not block or raise."""

    def revoke(self, subscription_id: str) -> None:
        """The subscription `subscription_id` was deleted: a stream serving it closes."""


class Broker(Protocol):
    """Guarantees (tests/broker/test_contract.py checks each, on every backend):

    * A change published for (user, app) reaches every listener registered for that pair before
      the publish (on any node), once, and in publish order; so each user's changes arrive in
      the order the dispatcher publishes them. A listener never sees another pair's changes.
      Delivery may happen after `publish` returns (a networked broker).
    * No storage: a change is not kept for listeners that register later (one registered after
      the change was delivered never gets it). Streams close that gap by registering first and
      then replaying the change log (see `outbound/streams.py`).
    * `publish` never waits for a slow listener: listeners buffer for themselves (a stream cuts
      off a client that falls too far behind). A listener that raises is logged and skipped;
      the others still get the change. A listener may unlisten while it is delivered to.
    * A networked broker may lose messages (a dropped connection, the server restarting): it
      then fills the gap from the change log (`broker/cursor.py`), so a listener still gets
      every change of its pair published after it listened, each once and in position order;
      it reads the listener's `sent` to know where the listener starts. Positions are per user,
      across apps (`model.Change`), which is what lets a node see that one is missing.
    * `unlisten` stops delivery to that listener only; an unknown listener is ignored.
    * `revoke` reaches the listeners of its (user, app) only.
    * After `close`, nothing more is delivered to this node's listeners; closing twice is
      harmless.
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
