"""The store's contract: one narrow Protocol per concern, and `Store`, their union.

A consumer is typed by the narrowest Protocol it needs (docs/architecture.md has the table);
SQLite and PostgreSQL implement them all alike, and the contract suite in tests/store (one file
per Protocol) checks every guarantee stated here on each backend.

What holds for every method of every Protocol:

* Durability: a write coroutine returns only after its transaction has committed. Writers batch
  concurrent calls into one transaction (group commit); one failing call never fails the others.
* Errors: only `herald.errors` exceptions escape (driver errors are translated at the boundary).
  `Unavailable` means the database could not be reached or refused for now (a retry later may
  succeed); a write answered so may or may not have been applied (the connection was lost after
  it was sent), so only a retry with an Idempotency-Key is safe for a create without
  appNotificationId.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import msgspec

from herald.model import (
    App,
    Change,
    Content,
    Delivery,
    NewDelivery,
    Notification,
    Pending,
    Provider,
    Settlement,
    StatePatch,
    Subscription,
)
from herald.preferences import HeldPush, HeldSummary, NotificationPreferences, StoredPreferences
from herald.query import Filter, Page, Query


class Remembered(msgspec.Struct, frozen=True):
    """A stored answer to an idempotent POST."""

    fingerprint: str
    status: int
    body: bytes
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Once:
    """An Idempotency-Key to record with a put, in the put's transaction (see `put_once`)."""

    scope: str
    key: str
    fingerprint: str
    expires: datetime
    # The answer to record, from the notification as written and whether it was created. Called
    # inside the transaction, before it commits; must not await anything.
    render: Callable[[Notification, bool], Remembered]


class Directory(Protocol):
    """Apps, their client ids, and user principal names.

    An app is its host name; it has one or more client ids (`App` is the app as one of them sees
    it). Feeds, subscriptions and push credentials are keyed by host name, so every client id of
    an app shares them. A principal name learned from a token never moves from one user to
    another: only an administrator's (pinned) call does that.
    """

    async def add_app(self, app: App) -> None:
        """Register an app with its first client id. `Conflict` if the client id or the host
        name is taken."""

    async def add_client(self, app: App) -> None:
        """Give the registered app `app.host_name` another client id (`app.client_id`, with its
        secret hash and platform; `display_name` is ignored). `NotFound` if there is no such
        app, `Conflict` if the client id is taken."""

    async def remove_client(self, client_id: str) -> None:
        """Remove a client id. `NotFound` if unknown; `Conflict` if it is its app's last one
        (an app always has one: `delete_app` removes the app)."""

    async def set_client_secret(self, client_id: str, secret_hash: str) -> None:
        """Replace a client id's secret hash (rotation: the old secret stops working at once
        at the token endpoint). `NotFound` if unknown."""

    async def get_app(self, client_id: str) -> App | None:
        """The app of this client id, as that client id sees it."""

    async def list_apps(self) -> builtins.list[App]:
        """Every client id of every app, ordered by host name, then by when it was added."""

    async def delete_app(self, host_name: str) -> dict[str, int] | None:
        """Remove the app and everything of it, in one transaction: its notifications, their
        changes and outbox entries, subscriptions, queued deliveries, push credentials,
        remembered idempotent answers and client ids. Returns how many rows of each kind went
        ("notifications", "changes", "subscriptions", "deliveries", "pushCredentials",
        "clientIds"...); None if there is no such app. Change positions are never reused: each
        user's next position stays past the removed changes."""

    async def user_of(self, upn: str) -> str | None:
        """The user id a user principal name (lower case) names, if known."""

    async def name_user(self, upn: str, user_id: str, pinned: bool, now: datetime) -> bool:
        """Record that `upn` (lower case) names `user_id`. An unpinned call (learned from a
        token) only adds a name nobody has: it never moves a name from one user to another, so
        whoever can edit their own `preferred_username` cannot take over another person's
        name. A pinned call (an administrator's) always wins and pins it. Returns whether the
        name now names `user_id`."""

    async def forget_user_name(self, upn: str) -> bool:
        """Remove a principal name; False if there was none."""

    async def list_user_names(self) -> builtins.list[tuple[str, str, bool]]:
        """(upn, user id, pinned) of every known name, by upn."""


class Notifications(Protocol):
    """Each user's notifications of each app: the feed.

    * Isolation: every call is scoped by (user_id, app); rows of another user or app are
      invisible (None / NotFound), never an error that reveals their existence.
    * Expiry: a notification whose expiration_date_time <= now is treated as absent by every
      read and write, even before `Retention.sweep` has removed it.
    * Change log: every write that changes a notification appends exactly one `Change` per
      affected notification, and an outbox entry for it, in the same transaction (see
      `ChangeLog` and `Outbox`).
    """

    async def put(
        self,
        user_id: str,
        app: str,
        content: Content,
        new_id: str,
        now: datetime,
        origin: str | None = None,
    ) -> tuple[Notification, bool]:
        """Create, or replace the live notification with the same (user, app, appNotificationId).

        `origin`: the subscription of the device that posted it, if it named itself (as in
        `update`); None for app servers.

        `content.app_notification_id` None means "equal to the id". On create the row gets
        `new_id`, version 1 and a CREATED change; returns (notification, True). On replace the id
        and created_date_time are kept, content is replaced, read/action state reset to
        unread/none, version incremented, an UPDATED change appended; returns (notification, False).
        """

    async def put_once(
        self,
        user_id: str,
        app: str,
        content: Content,
        new_id: str,
        now: datetime,
        once: Once,
        origin: str | None = None,
    ) -> Remembered:
        """`put`, recording `once` in the same transaction; returns the answer to give.

        If (once.scope, once.key) has an unexpired record (another request, process or node
        committed it first), nothing is written and that record is returned as it is (its
        fingerprint may differ from once.fingerprint: the caller answers 409 then). Otherwise the
        put is made, `once.render(notification, created)` is stored as the record (until
        `once.expires`; an expired record is replaced) and returned. Both commit together or not
        at all: a crash, a kill or a lost connection leaves both or neither (see `Idempotency`).
        """

    async def get(self, user_id: str, app: str, id: str, now: datetime) -> Notification | None: ...

    async def list(self, user_id: str, app: str, query: Query, now: datetime) -> Page:
        """One page: filter, order (then id), skip, top. `total` is set iff query.count."""

    async def count(self, user_id: str, app: str, filter: Filter | None, now: datetime) -> int: ...

    async def update(
        self,
        user_id: str,
        app: str,
        id: str,
        patch: StatePatch,
        if_match: int | None,
        now: datetime,
        origin: str | None = None,
    ) -> Notification:
        """Apply the non-None fields of `patch`, bump version and last_modified, append UPDATED.

        `origin` (here and in `delete`, `delete_group`) is the subscription id of the device that
        asked for the change; it is recorded on the change so fan-out can skip that device.

        `NotFound` if absent; `PreconditionFailed` if `if_match` is given and != version. A patch
        that changes nothing still bumps the version (it was a write) but is allowed.
        """

    async def delete(
        self,
        user_id: str,
        app: str,
        id: str,
        if_match: int | None,
        now: datetime,
        origin: str | None = None,
    ) -> None:
        """Remove the notification, append a DELETED tombstone. NotFound, PreconditionFailed."""

    async def delete_group(
        self, user_id: str, app: str, group_name: str, now: datetime, origin: str | None = None
    ) -> int:
        """Delete every live notification of the group; one tombstone each; returns the count."""


class ChangeLog(Protocol):
    """Each user's change log, as devices read it (delta sync, live streams), and how far each
    device has read it.

    Positions are per user, start at 1, and are gap-free and strictly increasing in commit
    order, so a reader that saw position N and later reads "> N" can never miss a change that
    committed later with a smaller position. A position is never reused, not even after the
    changes it numbered were pruned or their app deleted.
    """

    async def changes(
        self, user_id: str, app: str | None, after: int, limit: int
    ) -> builtins.list[Change]:
        """Changes with position > after, ascending, at most `limit`; `app` None means all apps.

        Created/updated changes carry the notification as it is *now* (None if it has since been
        deleted or expired: the later tombstone follows in the log).
        """

    async def horizon(self, user_id: str) -> tuple[int, int]:
        """(oldest retained position - 1, newest position). Positions <= the first were pruned."""

    async def lost(self, user_id: str, position: int) -> bool:
        """Whether `position` lies in a range the store skipped when it found its database on
        another history (a failover that lost commits, a restore: `store/postgres/epoch.py`):
        a position a device can only hold from a change that is gone. Accurate for the history
        of the last `horizon` read (read that first). Always False on SQLite."""

    def on_history(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) when this process finds the database on another
        history than the one it was on: live streams may have sent changes that are gone.
        Never on SQLite."""

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        """The newest position of each of these users (0 for a user without changes), in one
        read: a broker that fills gaps compares them with what it delivered (`broker/cursor.py`).
        """

    async def seen(self, subscription_id: str, position: int) -> None:
        """Raise the subscription's `seen_position` to `position` (never lowers it; an unknown
        id is ignored)."""


class Retention(Protocol):
    """What the sweeper removes: expired rows of every kind, and the change log's old end."""

    async def take_turn(self, name: str, now: datetime, interval: float) -> bool:
        """Whether the caller runs the periodic job `name` now: True, recording `now` as its last
        run, if it last ran (on any process sharing the store) `interval` seconds or more before
        `now`, or never; else False. Of concurrent callers, at most one gets True per interval,
        so N processes each asking once an interval run the job once an interval between them.
        """

    async def sweep(self, now: datetime, retain_changes_until: datetime, limit: int) -> int:
        """Remove up to `limit` expired notifications (appending EXPIRED changes), up to `limit`
        expired subscriptions (with their queued deliveries), every expired idempotency record
        and redeemed sign-in code, and prune change log entries older than
        `retain_changes_until` (with any outbox entry still pointing at one;
        `ChangeLog.horizon` moves past them). Returns the number of notifications expired."""

    async def prune_sends(self, finished_before: datetime, limit: int) -> int:
        """Remove up to `limit` sends (`Audiences`) that finished before `finished_before`,
        oldest first, with their recipients, failures and recipients' idempotency records: the
        operation is then unknown, and its Idempotency-Key free again. A send not finished is
        never removed. Returns how many went."""


class Outbox(Protocol):
    """What the dispatcher drains: the changes not yet published, whom to push them to, and the
    transaction that takes them out and queues their pushes.

    Every appended `Change` gets an outbox entry in the same transaction. `pending` returns
    entries oldest first; an entry stays until `dispatched` removes it, so a crash between
    commit and dispatch loses nothing (the dispatcher re-reads it on restart). For one user,
    entries come out in position order.
    """

    async def pending(
        self, limit: int, shards: Collection[int] | None = None, skip: Collection[int] = ()
    ) -> builtins.list[Pending]:
        """Up to `limit` undispatched outbox entries, ascending by seq. Each change carries the
        notification as it is now, like `ChangeLog.changes`. `shards`: only the entries of users
        in these shards (see `Shards`); None: every entry. A backend whose `Shards.lease` always
        grants every shard (SQLite) takes None only. `skip`: seqs to leave out, not counted in
        `limit` (the dispatcher's entries whose removal has not committed yet: read again, each
        would cost its joins once per batch until then). `Pending.pushable` may be False only if
        `push_targets` would have found no subscription of the change's (user, app) then."""

    async def waiting(self, limit: int) -> int:
        """How many outbox entries wait to be dispatched (any node's), counted up to `limit`;
        no change is read. For the pacing of sends, apart from the dispatcher's own reads."""

    async def push_targets(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> builtins.list[Subscription]:
        """The subscriptions of these (user_id, app) pairs that have a push channel, are
        unexpired and not gone; ordered by (user_id, app, created_date_time)."""

    async def dispatched(
        self,
        seqs: Sequence[int],
        deliveries: Sequence[NewDelivery] = (),
        held: Sequence[HeldPush] = (),
    ) -> None:
        """Remove these outbox entries (unknown seqs are ignored) and enqueue `deliveries`, and
        keep the alerting pushes `held` for quiet hours (`Preferences`), in one transaction: a
        crash leaves either all or none. `held` is queued exactly once as deliveries are.

        Exactly once, across processes: a delivery is inserted only if the outbox entry of its
        change (user_id, message.position) was removed by *this* call (two nodes draining one
        outbox queue nothing twice).

        Superseding: for every outbox entry this call removes, queued deliveries of the same
        user and notification with a smaller message.position are deleted first (whatever their
        subscription): a later change carries the current state, so an older alert waiting for a
        retry, or an iOS fallback waiting for its delay, must not arrive after it. (A claimed
        one already in flight is not stopped.)"""

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop after every commit that added outbox entries, so the
        dispatcher need not poll. Other processes' commits are not signalled. A callback that
        raises is logged and fails neither the write nor the other callbacks."""

    def on_outboxed(self, take: Callable[[builtins.list[Pending], bool], Awaitable[None]]) -> None:
        """Hand the dispatcher a post's entry as it commits, so that it can publish the change
        without reading it back (a round trip on the path of every live delivery): after a
        commit of puts, before its `on_commit` callbacks, await `take(entries, whole)`. `entries`:
        ascending by seq, those that were their users' first left in the outbox when they
        committed (every earlier change of the user had been removed by `dispatched`, so
        publishing them now keeps each user's order), each as `pending` would read it then;
        `whole`: they are every entry that commit added. Entries stay in the outbox until
        `dispatched` removes them (`pending` still returns them). Only this process's commits
        are handed over, and a backend may hand over none (PostgreSQL: only while posts trickle
        in, where latency is what a saved round trip buys; SQLite: none). A `take` that raises
        is logged and fails neither the write nor the callbacks."""


# The outbox is split into this many shards by user (PostgreSQL: `hashtextextended(user_id, 0) &
# 63`, computed in the database so every node agrees).
SHARDS = 64


class Shards(Protocol):
    """Who dispatches which users: each of the `SHARDS` shards of the outbox is leased to at most
    one node at a time, without a leader. A node is a process, named by a string unique to it.

    * A lease lasts `ttl` seconds from the call that granted or renewed it, on the database's
      clock (nodes' clocks need not agree). A node that stops renewing loses its shards when they
      expire; another node's next `lease` takes them.
    * `lease` renews every lease the node holds, records its heartbeat, and balances: with L
      live nodes (heartbeat younger than `ttl`), a node takes unowned or expired shards up to
      ceil(SHARDS / L) and releases what it holds beyond that (a joining node gets its share).
      Two nodes never hold one shard at once: taking is one transaction per node, and a shard
      held by a live lease is never taken.
    * `release` gives up every shard of the node and its heartbeat (a clean shutdown: the others
      take them at their next `lease`, without waiting for the leases to run out).
    * What a lease does not do: fence. A node that was paused past its lease may still finish a
      batch of a shard another node has taken. `Outbox.dispatched` keeps pushes exactly once
      even then, and brokers drop repeated positions; the caller stops dispatching when its
      lease, measured from before it asked, may have run out.

    SQLite is single-process: every call grants every shard, and `release` does nothing.
    """

    async def lease(self, node: str, ttl: float) -> frozenset[int]:
        """Renew, take and balance as above; the shards `node` holds once this has committed."""

    async def release(self, node: str) -> None:
        """Give up `node`'s shards and heartbeat. Idempotent."""


class Subscriptions(Protocol):
    """Devices: one subscription each, with its push channel, if any.

    A push channel reaches one device, so its key (endpoint, token or URI) is unique per app:
    registering it again updates the holder, and a subscription of another user that holds it
    loses it (with its queued deliveries). Expired subscriptions are absent to every call but
    `channel_holder`. Deleting a subscription deletes its queued deliveries.
    """

    async def add_subscription(
        self, sub: Subscription, limit: int, now: datetime
    ) -> tuple[Subscription, bool]:
        """Register a device; returns (stored subscription, created).

        If the same user already has a live subscription of this app with the same channel key,
        that one is updated in place (its id and created_date_time kept) and returned with
        created=False; one of *another* user with that key is deleted (a shared browser must
        not go on receiving the previous person's notifications). `QuotaExceeded` if creating
        would give the user more than `limit` unexpired subscriptions of the app; `Conflict` if
        the id is taken. A subscription whose channel changes gets a fresh DeliveryState.
        """

    async def get_subscription(self, id: str, now: datetime) -> Subscription | None:
        """By id alone (the UNS ID names the user); None if absent or expired. Callers check
        that it belongs to the calling app and user."""

    async def live_subscriptions(self, ids: Sequence[str], now: datetime) -> set[str]:
        """Which of these ids are unexpired subscriptions, in one read (unknown ids are not an
        error). Streams check theirs with it, so a deletion on another node closes them even
        if its broker message was lost (`outbound/streams.py`)."""

    async def subscription_removals(self) -> int:
        """A number that changes whenever subscriptions are removed, by any call (a delete, a
        push channel taken over, `delete_app`, `sweep`) on any process sharing the store: a
        caller that read it, then checked the subscriptions it cares about
        (`live_subscriptions`), need check them again only once it has changed."""

    async def channel_holder(self, app: str, key: str) -> Subscription | None:
        """The subscription of `app` (expired or not) holding the push channel `key`, if any:
        the one `add_subscription`/`update_subscription` would release."""

    async def list_subscriptions(
        self, user_id: str, app: str, now: datetime
    ) -> builtins.list[Subscription]:
        """The unexpired subscriptions of (user, app), oldest first."""

    async def update_subscription(self, sub: Subscription, now: datetime) -> Subscription:
        """Replace display_name, platform, push_channel, expiration_date_time and
        last_modified_date_time of the unexpired subscription `sub.id` of (sub.user_id, sub.app);
        `NotFound` otherwise. A push channel key taken by another subscription of the app is
        released from it as in `add_subscription` (same user: that other one is deleted)."""

    async def delete_subscription(self, user_id: str, app: str, id: str) -> None:
        """`NotFound` if (user, app) has no such subscription (expired ones count as absent)."""


class DeliveryQueue(Protocol):
    """The pushes queued by `Outbox.dispatched`, per provider, until they are settled.

    A delivery lives in the store until it is settled, so retries survive restarts. `claim`
    leases what it returns (moves its due time), so two nodes never send the same delivery at
    once, and a crashed node's claims come back after the lease.
    """

    async def claim(
        self, provider: Provider, now: datetime, lease: float, limit: int
    ) -> builtins.list[Delivery]:
        """Up to `limit` deliveries of `provider` with due <= now, earliest due first (then id).

        Each returned one has its due moved to now + `lease` seconds and attempts + 1, committed
        before this returns. Deliveries that can no longer be sent are deleted in the same
        transaction and not returned: their subscription is deleted, expired or gone, no longer
        has a channel of this provider, or their message expired (expires <= now).
        """

    async def settle(self, outcomes: Sequence[Settlement], now: datetime) -> None:
        """Record outcomes in one transaction.

        A settlement applies only to the claim it answers: if the delivery no longer exists or
        its `attempts` differs from the settlement's (it was claimed again after its lease ran
        out), the settlement is ignored entirely. The subscription's DeliveryState is changed
        only if its current channel key equals the settlement's `channel_key` (a device that
        registered a new channel meanwhile keeps its fresh state; a GONE for the old channel
        does not mark the new one gone, and deletes no delivery but this one).

        * DONE: delete the delivery. If `sent`: the subscription's last_delivered = now,
          consecutive_failures = 0, last_error = None.
        * RETRY: set its due to `due`; the subscription's consecutive_failures + 1, last_error.
        * DROP: delete it; consecutive_failures + 1, last_error.
        * GONE: delete it and every other delivery of that subscription; gone_date_time = now,
          consecutive_failures + 1, last_error.

        `last_error` is stored printable and cut to a bounded length, whatever the text.
        """

    async def next_due(self, provider: Provider) -> datetime | None:
        """The earliest due time among `provider`'s deliveries, None if there are none."""

    async def count_deliveries(self, provider: Provider | None = None) -> int:
        """How many deliveries are queued (of one provider, or all)."""


class PushCredentials(Protocol):
    """Each app's push credentials (VAPID key, APNs, FCM and WNS secrets), by kind."""

    async def get_push_credentials(self, app: str) -> dict[str, bytes]:
        """The stored push credentials of the app (host name), by kind ("vapid", "apns", "fcm",
        "wns"). Opaque bytes: each channel owns its format."""

    async def put_push_credentials(
        self, app: str, kind: str, secret: bytes, replace: bool = True
    ) -> bytes:
        """Store a credential; with `replace=False` an existing one is kept. Returns the one now
        stored (so concurrent first-time generation, on several nodes too, agrees on one key)."""

    async def delete_push_credentials(self, app: str, kind: str) -> bool:
        """Remove a credential; False if there was none."""


class Idempotency(Protocol):
    """The answers recorded for Idempotency-Keys.

    A record is written only by `Notifications.put_once`, in the transaction of the notification
    it answers for: a retry with the key either finds the record (and replays the first answer)
    or finds nothing written. A record's (scope, key) is unique across processes and nodes: the
    first to commit wins. (There is no call that records an answer on its own: an answer that
    wrote nothing need not be replayed, and one that wrote something must commit with it.)
    """

    async def recall(self, scope: str, key: str, now: datetime) -> Remembered | None:
        """The stored answer for an Idempotency-Key, unless it has expired."""


class Issuance(Protocol):
    """What the embedded issuer keeps in the store, so that every process sharing it agrees: its
    signing key (a token minted via one node is accepted by all) and the sign-in codes already
    redeemed (a code works once, whichever node it reaches)."""

    async def issuer_key(self, candidate: bytes) -> bytes:
        """The stored signing key; if there is none, `candidate` is stored and returned.
        Write-once: of concurrent first callers (processes, nodes) one candidate is stored and
        every caller gets that one. Opaque bytes: the issuer owns the format."""

    async def redeem_code(self, code_id: str, expires: datetime, now: datetime) -> bool:
        """Record the sign-in code `code_id` as redeemed until `expires`: True the first time,
        False if it already is (an unexpired record: whoever committed first wins, across
        processes and nodes). A record expired by `now` is replaced; `Retention.sweep` removes
        expired ones."""


class Preferences(Protocol):
    """Each user's notification preferences per app, and the alerting pushes held during their
    quiet hours (docs/push.md, "Preferences and quiet hours").

    Held pushes are rows until their release: they survive restarts, and go with their
    subscription (deleted, taken over, expired) and with `Directory.delete_app`.
    """

    async def get_preferences(self, user_id: str, app: str) -> StoredPreferences | None:
        """The preferences of (user, app); None if never set."""

    async def put_preferences(
        self,
        user_id: str,
        app: str,
        preferences: NotificationPreferences,
        if_match: int | None,
        now: datetime,
        release: datetime | None = None,
    ) -> StoredPreferences:
        """Replace them (creating them at version 1), version + 1. `PreconditionFailed` if
        `if_match` is given and is not the current version (0: never set). `release`: when the
        pushes (user, app) has held are now to be released (the new quiet hours decide), in
        the same transaction; None leaves them as they are."""

    async def push_audience(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> tuple[builtins.list[Subscription], dict[tuple[str, str], NotificationPreferences]]:
        """`Outbox.push_targets`, and the preferences of those pairs that have subscriptions
        and preferences, in one read."""

    async def release_held(
        self, now: datetime, limit: int, summary: Callable[[HeldSummary], NewDelivery]
    ) -> builtins.list[NewDelivery]:
        """Release the held pushes due by `now` of up to `limit` subscriptions: all of each
        one's due pushes are deleted, and, if any of their notifications is still unexpired,
        unread and neither dismissed nor activated, `summary` (called inside the transaction,
        must not await) makes the one delivery queued for that subscription in the same
        transaction. Returns what was queued. Exactly once across processes: a held push is
        released by one call only."""

    async def count_held(self, user_id: str, app: str) -> int:
        """How many pushes (user, app) has held."""


class Webhook(msgspec.Struct, frozen=True, kw_only=True):
    """An app's webhook: where Herald POSTs the app's change feed, and how far delivery got.

    `cursor` is the feed seq delivered up to (`ChangeFeed`); `status` is "active", "failed"
    (delivery gave up: `settings.webhook_give_up`) or "disabled" (by the app). `failures`
    counts the failed attempts since the last success, the first of them at `failing_since`.
    """

    id: str
    app: str
    url: str
    secret: str
    kinds: tuple[str, ...]
    status: str
    cursor: int
    created: datetime
    last_modified: datetime
    failures: int = 0
    failing_since: datetime | None = None
    next_attempt: datetime | None = None
    last_attempt: datetime | None = None
    last_success: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None


class FeedPage(msgspec.Struct, frozen=True):
    """One read of an app's feed: `entries` (seq, change); `cursor`, the seq to read on from;
    `more`, whether entries of the app may follow it now. Entries whose change was pruned from
    the log are skipped, so `entries` may be shorter than the limit while `more` holds. Once
    `more` is False, `cursor` is the feed's newest seq as of the read (every entry of the app up
    to it was read, whatever other apps added)."""

    entries: builtins.list[tuple[int, Change]]
    cursor: int
    more: bool


class ChangeFeed(Protocol):
    """Each app's change feed: every change of the app's notifications, of all its users, in one
    order (docs/api.md "Change feed").

    An app's changes are recorded from when it starts using the feed (`enable_feed`): changes
    of apps that never did cost no more than a lookup. From then on every appended `Change` of
    the app gets its place in the feed in the change's own transaction (nothing committed is
    ever missing from it), numbered by a global `seq`:

    * a reader that saw seq N and later reads "> N" never misses a change: the store hands out
      seqs only to committed changes, each above every seq handed out before;
    * for one user, seq order is position order; across users it is the order the changes were
      written in (for changes that were not written at the same time, their commit order);
    * a seq is never reused, and the feed is pruned only at its old end (`prune_feed`).
    """

    async def enable_feed(self, app: str, now: datetime) -> None:
        """Record the app's changes from now on (idempotent). Once this returns, every change
        of the app that commits afterwards is in the feed (PostgreSQL waits for writes already
        under way, which may not have seen the app enabled, to end first)."""

    async def app_changes(self, app: str, after: int, limit: int) -> FeedPage:
        """Up to `limit` entries of `app` with seq > `after`, ascending, each change with the
        notification as it is now, like `ChangeLog.changes` (see `FeedPage`)."""

    async def feed_bounds(self) -> tuple[int, int]:
        """(the newest pruned seq, the newest seq): a cursor below the first is behind the
        horizon, one above the second was never issued."""

    async def feed_lost(self, seq: int) -> bool:
        """As `ChangeLog.lost`, for the feed's seqs: whether `seq` lies in a range skipped when
        the store found its database on another history (read `feed_bounds` first)."""

    async def prune_feed(self, before: datetime) -> int:
        """Remove the feed's oldest entries, those of changes made before `before`, up to the
        first younger one (a prefix; the newest entry always stays, so seqs go on from it).
        Returns how many went."""


class Webhooks(Protocol):
    """Each app's webhooks and their delivery state. A webhook of another app is absent (None,
    NotFound, False), never an error that reveals it."""

    async def add_webhook(self, hook: Webhook, limit: int) -> Webhook:
        """Store a new webhook, its cursor at the feed's newest seq (it delivers what comes
        next), the app's feed enabled first (`ChangeFeed.enable_feed`).
        `QuotaExceeded` if the app would have more than `limit`; `Conflict` if the id is
        taken."""

    async def get_webhook(self, app: str, id: str) -> Webhook | None: ...

    async def list_webhooks(self, app: str) -> builtins.list[Webhook]:
        """The app's webhooks, oldest first."""

    async def update_webhook(self, hook: Webhook) -> Webhook:
        """Replace url, secret, kinds, status, last_modified and the retry state (failures,
        failing_since, next_attempt) of `hook.id` of `hook.app`; the cursor and the record of
        attempts are kept. `NotFound` if absent."""

    async def delete_webhook(self, app: str, id: str) -> bool: ...

    async def due_webhooks(self, now: datetime) -> builtins.list[Webhook]:
        """Every active webhook (of every app) whose next attempt is due (or not set) and whose
        app's feed has an entry after its cursor: one with nothing to deliver is not due (a
        commit of one app must not cost a read of every other app's webhooks)."""

    async def webhooks_active(self) -> bool:
        """Whether any webhook (of any app) is active."""

    async def webhook_delivered(
        self, id: str, after: int, cursor: int, now: datetime, status: int | None
    ) -> bool:
        """Move the cursor from `after` to `cursor` and clear the retry state; `status` (the
        receiver's answer, None if nothing needed sending) is recorded as the last attempt's.
        Only if the cursor is still `after` (compare and set: a node that lost the webhook
        meanwhile cannot move it back); returns whether it did."""

    async def webhook_failed(
        self,
        id: str,
        after: int,
        now: datetime,
        status: int | None,
        error: str,
        next_attempt: datetime,
        give_up: bool,
    ) -> bool:
        """Record a failed attempt at delivering from `after` (if the cursor is still there):
        failures + 1, failing_since set if unset, the next attempt; status "failed" if
        `give_up`. `error` is stored printable and cut to a bounded length."""


@dataclass(frozen=True, slots=True)
class Audience:
    """A named set of users an app maintains (`Audiences`)."""

    app: str
    id: str
    display_name: str | None
    created: datetime
    members: int


@dataclass(frozen=True, slots=True)
class Send:
    """One request to reach many users, and how far it has got (`Audiences`).

    `status`: "notStarted", "running", "succeeded" or "failed" (every recipient failed).
    `done` recipients (in order of the snapshot) have been handled, `failed` of them with a
    `Failure`. `content` is the notification as accepted (msgpack of `model.Content`)."""

    id: str
    app: str
    idempotency_key: str | None
    fingerprint: str
    audience: str | None
    content: bytes
    total: int
    done: int
    failed: int
    status: str
    created: datetime
    last_action: datetime
    finished: datetime | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one recipient of a send got no notification."""

    user_id: str
    code: str
    message: str


class Audiences(Protocol):
    """Audiences (named sets of users, per app) and sends to many users.

    * Every call is scoped by app: another app's audiences and sends are absent (None,
      `NotFound`).
    * A send is stored whole (content and the recipients, an audience's as of the call) before
      `start_send` returns; a runner then creates each recipient's notification through
      `Notifications.put_once` and records its progress with `send_progress`.
    """

    async def put_audience(
        self, app: str, id: str, display_name: str | None, limit: int, now: datetime
    ) -> Audience:
        """Create an empty audience. `Conflict` if the app has one with this id,
        `QuotaExceeded` if the app would have more than `limit`."""

    async def get_audience(self, app: str, id: str) -> Audience | None: ...

    async def list_audiences(self, app: str) -> builtins.list[Audience]:
        """Every audience of the app, by id."""

    async def delete_audience(self, app: str, id: str) -> bool:
        """Remove it with its members (sends already made keep their snapshot)."""

    async def add_members(self, app: str, id: str, users: Sequence[str], limit: int) -> int:
        """Add these users (already members are ignored); the number added. `NotFound` if no
        such audience; `QuotaExceeded`, and nothing added, if it would have more than `limit`
        members."""

    async def remove_members(self, app: str, id: str, users: Sequence[str]) -> int:
        """Remove these users (non-members are ignored); the number removed. `NotFound`."""

    async def members(self, app: str, id: str, after: str | None, limit: int) -> builtins.list[str]:
        """Up to `limit` member user ids greater than `after`, ascending. `NotFound`."""

    async def start_send(
        self,
        send: Send,
        recipients: Sequence[str] | None,
        limit: int,
    ) -> tuple[Send, bool]:
        """Store a send with its recipients in one transaction: `recipients`, or (None) the
        members of `send.audience` as of now. Returns (send, True); or, if the app already has
        a send with this `idempotency_key`, (that send, False) and nothing is written (its
        fingerprint may differ: the caller refuses then). `NotFound` if the audience does not
        exist, `QuotaExceeded` if it has more than `limit` members."""

    async def get_send(self, app: str, id: str) -> Send | None: ...

    async def send_failures(self, app: str, id: str, limit: int) -> builtins.list[Failure]:
        """Up to `limit` failures of the send, by user id."""

    async def unfinished_sends(
        self, limit: int, shards: Collection[int] | None = None
    ) -> builtins.list[Send]:
        """Up to `limit` sends not yet finished, oldest first; `shards` as in
        `Outbox.pending` (a send's shard is that of its id)."""

    async def send_recipients(self, id: str, offset: int, limit: int) -> builtins.list[str]:
        """The recipients of the send from position `offset` (0-based) on, at most `limit`."""

    async def send_progress(
        self,
        id: str,
        done: int,
        failures: Sequence[Failure],
        status: str,
        now: datetime,
    ) -> None:
        """Record that the first `done` recipients are handled, adding `failures` (one per
        user: a repeated one is ignored, and `failed` counts each once). `done` never goes
        back. A final `status` ("succeeded", "failed") sets `finished`."""


class Store(
    Directory,
    Notifications,
    ChangeLog,
    Retention,
    Outbox,
    Shards,
    Subscriptions,
    DeliveryQueue,
    PushCredentials,
    Idempotency,
    Issuance,
    Preferences,
    ChangeFeed,
    Webhooks,
    Audiences,
    Protocol,
):
    """All of Herald's durable state, as one backend keeps it: what opens, closes and checks the
    database (the process's lifecycle), and what a backend implements (each backend is one
    object: its writer's transactions span several concerns, such as `delete_app`, `sweep` and
    `dispatched`)."""

    async def open(self) -> None:
        """Connect and apply forward-only migrations; refuse a schema newer than this code."""

    async def close(self) -> None:
        """Flush pending writes and release connections. Idempotent."""

    async def ping(self) -> None:
        """Raise `Unavailable` if the database cannot answer a trivial query."""
