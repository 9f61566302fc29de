"""The next stored version of a record, computed inside the write's transaction from the one it
replaces: a notification put (`Put`: the call, as both backends queue it) or patched, a
subscription registered again. Both backends store exactly what these return."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from herald.errors import NotFound, PayloadTooLarge, PreconditionFailed
from herald.model import Content, DeliveryState, Notification, StatePatch, Subscription
from herald.store.contract import Once


def matching(n: Notification | None, id: str, if_match: int | None) -> Notification:
    """The live notification an update or delete acts on: NotFound when there is none,
    PreconditionFailed when `if_match` names another version."""
    if n is None:
        raise NotFound(f"notification {id} not found")
    if if_match is not None and if_match != n.version:
        raise PreconditionFailed(f"notification {n.id} is at version {n.version}, not {if_match}")
    return n


@dataclass(slots=True)
class Put:
    """A `put` (or `put_once`) call, as a backend queues it for its writer."""

    user_id: str
    app: str
    content: Content
    new_id: str
    now: datetime
    origin: str | None = None
    once: Once | None = None


def new_notification(p: Put, now: datetime, old: Notification | None) -> Notification:
    """The stored form of the put's content, written at `now` (UTC): new, or replacing `old`
    (id and creation time kept)."""
    content, new_id = p.content, p.new_id
    return Notification(
        id=new_id if old is None else old.id,
        user_id=p.user_id,
        app=p.app,
        app_notification_id=content.app_notification_id or new_id,
        target_host_name=content.target_host_name,
        group_name=content.group_name,
        payload=content.payload,
        target_policy=content.target_policy,
        priority=content.priority,
        display_time_to_live=content.display_time_to_live,
        expiration_date_time=content.expiration_date_time.astimezone(UTC),
        fallback_policy=content.fallback_policy,
        created_date_time=now if old is None else old.created_date_time,
        last_modified_date_time=now,
        version=1 if old is None else old.version + 1,
        extra=content.extra,
    )


def patched(old: Notification, patch: StatePatch, now: datetime) -> Notification:
    """`old` with the non-None fields of `patch` applied, as a new version written at `now`.

    Open-type properties merge: each one in `patch.extra` is set, or removed when null. The
    merged set must fit `patch.max_extra_bytes` (checked here, inside the write: two patches
    that each fit can add up); `PayloadTooLarge` otherwise, before anything is written."""
    changes = {k: v for k, v in msgspec.structs.asdict(patch).items() if v is not None}
    del changes["max_extra_bytes"]
    if "expiration_date_time" in changes:
        changes["expiration_date_time"] = changes["expiration_date_time"].astimezone(UTC)
    if patch.extra is not None:
        changes["extra"] = merged = merge_extra(old.extra, patch.extra)
        size = len(merged or b"")
        if patch.max_extra_bytes and size > patch.max_extra_bytes:
            raise PayloadTooLarge(
                f"The open properties would take {size} bytes encoded; the limit is "
                f"{patch.max_extra_bytes} bytes."
            )
    return msgspec.structs.replace(
        old, **changes, version=old.version + 1, last_modified_date_time=now.astimezone(UTC)
    )


def merge_extra(old: bytes | None, update: bytes) -> bytes | None:
    merged: dict[str, Any] = msgspec.json.decode(old) if old else {}
    for name, value in msgspec.json.decode(update, type=dict[str, Any]).items():
        merged.pop(name, None)  # re-inserted last: the newest property is echoed last
        if value is not None:
            merged[name] = value
    return msgspec.json.encode(merged) if merged else None


def stored_subscription(
    sub: Subscription, kept: Subscription | None = None, reset: bool = True
) -> Subscription:
    """`sub` as a read returns it (datetimes in UTC); `kept`: the row it updates in place, whose
    id, creation time and seen position it keeps, and its delivery state unless `reset`. A new
    row starts with a fresh delivery state and seen position 0."""
    return msgspec.structs.replace(
        sub,
        id=sub.id if kept is None else kept.id,
        created_date_time=(sub if kept is None else kept).created_date_time.astimezone(UTC),
        expiration_date_time=sub.expiration_date_time.astimezone(UTC),
        last_modified_date_time=sub.last_modified_date_time.astimezone(UTC),
        delivery=DeliveryState() if kept is None or reset else kept.delivery,
        seen_position=0 if kept is None else kept.seen_position,
    )
