"""The app-wide change feed as app servers see it (docs/api.md "Change feed"): each change of an
app's notifications, of every user, as one event; the same events reach the pull feed
(`GET /beta/notificationChanges`) and webhooks (`outbound/webhooks.py`).

An event is a change as the change log has it (the store's `ChangeFeed`): `created`, `updated`
(a user read, dismissed or activated it, a device changed it, or the app replaced its content:
`contentReplaced`), `deleted` (by the user, a device or the app) or `expired` (its
expirationDateTime passed: never reported as `deleted`). `notification` is its state as it is
*now*, when the event is read or sent (null once it is deleted or expired), like delta's.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

import msgspec

from herald.errors import InvalidRequest
from herald.model import Change, ChangeKind, Notification, Priority, ReadState, UserActionState

KINDS = tuple(k.value for k in ChangeKind)


class NotificationState(msgspec.Struct, frozen=True, rename="camel"):
    """What an app server needs to act on a change: the state, not the content it posted."""

    app_notification_id: str
    group_name: str | None
    priority: Priority
    read_state: ReadState
    user_action_state: UserActionState
    version: int
    created_date_time: datetime
    last_modified_date_time: datetime
    expiration_date_time: datetime


class ChangeEvent(msgspec.Struct, frozen=True, rename="camel"):
    id: str  # the feed seq as a string: unique across the app's feed, for de-duplication
    sequence: int
    change_type: str
    user_id: str
    notification_id: str
    position: int  # the user's change position (as delta's)
    changed_date_time: datetime
    content_replaced: bool
    notification: NotificationState | None


def state(n: Notification) -> NotificationState:
    return NotificationState(
        app_notification_id=n.app_notification_id,
        group_name=n.group_name,
        priority=n.priority,
        read_state=n.read_state,
        user_action_state=n.user_action_state,
        version=n.version,
        created_date_time=n.created_date_time,
        last_modified_date_time=n.last_modified_date_time,
        expiration_date_time=n.expiration_date_time,
    )


def event(seq: int, change: Change) -> ChangeEvent:
    return ChangeEvent(
        id=str(seq),
        sequence=seq,
        change_type=change.kind.value,
        user_id=change.user_id,
        notification_id=change.notification_id,
        position=change.position,
        changed_date_time=change.at,
        content_replaced=change.replaced,
        notification=None if change.notification is None else state(change.notification),
    )


# Cursors are opaque to clients: a version tag and the seq, base64url without padding.
TOKEN_TAG = "f1."


def token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{TOKEN_TAG}{seq}".encode()).decode().rstrip("=")


def seq_of(text: str, name: str) -> int:
    """The seq a token carries; `InvalidRequest` if it is not one this server issued."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    digits = raw.removeprefix(TOKEN_TAG)
    if not raw.startswith(TOKEN_TAG) or not digits.isdigit() or len(digits) > 18:
        raise InvalidRequest(f"{name} is not a token this server issued.", target=name)
    return int(digits)
