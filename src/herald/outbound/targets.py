"""Target selection: which push channels a change goes to, and what each is sent (docs/push.md,
"What a device is sent"). Pure: the dispatcher hands in the change and the user's push
subscriptions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from herald.model import (
    PROVIDER_OF,
    Change,
    ChangeKind,
    DevicePlatform,
    Message,
    NewDelivery,
    Notification,
    Payload,
    Platform,
    PushKind,
    ReadState,
    Subscription,
    UserActionState,
)
from herald.outbound.providers import PROVIDERS

# A removal has no notification (and so no expiration) left: try it for a day at most.
REMOVE_TTL = timedelta(days=1)


def deliveries(
    change: Change, subs: Iterable[Subscription], now: datetime
) -> Iterator[NewDelivery]:
    """The pushes for one change to the subscriptions of its (user, app)."""
    for sub in subs:
        if sub.push_channel is None or sub.id == change.origin:
            continue
        provider = PROVIDER_OF[type(sub.push_channel)]
        for message, due in _messages(change, sub, PROVIDERS[provider].silent, now):
            yield NewDelivery(
                subscription_id=sub.id,
                user_id=sub.user_id,
                app=sub.app,
                provider=provider,
                message=message,
                due=due,
            )


def _messages(
    change: Change, sub: Subscription, silent: bool, now: datetime
) -> Iterator[tuple[Message, datetime]]:
    """`silent`: whether the subscription's provider carries silent pushes (syncs, removals)."""
    n = change.notification
    if change.kind is ChangeKind.DELETED:
        if silent:
            yield _removal(change, now), now
        return
    if n is None or change.kind is ChangeKind.EXPIRED:
        return  # expired: every push carried the expiration as its TTL
    if sub.platform.value not in n.target_policy.platform_types:
        return
    fresh = change.kind is ChangeKind.CREATED or change.replaced
    kind = PushKind.ALERT if fresh and not _dealt_with(n) else PushKind.SYNC
    if kind is PushKind.SYNC and not silent:
        return  # e.g. web clients: they sync over their live stream
    yield _message(n, change.position, kind, n.payload), now
    fallback = n.fallback_policy
    if (
        kind is PushKind.ALERT
        and fallback is not None
        and n.payload.visual_content is None  # else the device was alerted already
        and sub.platform is DevicePlatform.IOS
        and Platform.IOS in fallback.endpoint_fallback.platform_types
    ):
        policy = fallback.endpoint_fallback
        due = now + timedelta(seconds=policy.fallback_delay_in_seconds)
        payload = Payload(visual_content=policy.visual_content)
        yield _message(n, change.position, PushKind.FALLBACK, payload), due


def _dealt_with(n: Notification) -> bool:
    return n.read_state is not ReadState.UNREAD or n.user_action_state in (
        UserActionState.DISMISSED,
        UserActionState.ACTIVATED,
    )


def _message(n: Notification, position: int, kind: PushKind, payload: Payload) -> Message:
    return Message(
        kind=kind,
        notification_id=n.id,
        app_notification_id=n.app_notification_id,
        position=position,
        group_name=n.group_name,
        payload=payload,
        priority=n.priority,
        read_state=n.read_state,
        user_action_state=n.user_action_state,
        display_time_to_live=n.display_time_to_live,
        expires=n.expiration_date_time,
    )


def _removal(change: Change, now: datetime) -> Message:
    return Message(
        kind=PushKind.REMOVE,
        notification_id=change.notification_id,
        app_notification_id="",
        position=change.position,
        expires=max(now, change.at) + REMOVE_TTL,
    )
