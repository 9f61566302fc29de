"""The domain: notifications, their server-side state, changes, and registered apps.

These are plain msgspec structs with snake_case attributes. The nested value types encode with
Graph's camelCase names (they are stored and sent as they are); `api/schemas.py` maps the rest.
Enum values are the canonical wire spellings.
"""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec


class ReadState(enum.StrEnum):
    UNREAD = "unread"
    READ = "read"


class UserActionState(enum.StrEnum):
    NONE = "none"
    ACTIVATED = "activated"
    DISMISSED = "dismissed"
    SNOOZED = "snoozed"


class Priority(enum.StrEnum):
    NONE = "None"
    HIGH = "High"
    LOW = "Low"


class Platform(enum.StrEnum):
    WINDOWS = "windows"
    IOS = "iOS"
    ANDROID = "android"
    WEBPUSH = "webPush"


ALL_PLATFORMS: tuple[Platform, ...] = tuple(Platform)


class ChangeKind(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    EXPIRED = "expired"


class VisualContent(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    title: str
    body: str | None = None


class Payload(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    raw_content: str | None = None
    visual_content: VisualContent | None = None


class TargetPolicy(msgspec.Struct, frozen=True, rename="camel"):
    platform_types: tuple[Platform, ...] = ALL_PLATFORMS


class EndpointFallback(msgspec.Struct, frozen=True, rename="camel"):
    platform_types: tuple[Platform, ...]
    fallback_delay_in_seconds: int
    visual_content: VisualContent


class FallbackPolicy(msgspec.Struct, frozen=True, rename="camel"):
    endpoint_fallback: EndpointFallback


class Content(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the app server sets on a notification (validated)."""

    target_host_name: str
    app_notification_id: str | None = None
    group_name: str | None = None
    payload: Payload
    target_policy: TargetPolicy = TargetPolicy()
    priority: Priority = Priority.NONE
    display_time_to_live: int | None = None
    expiration_date_time: datetime
    fallback_policy: FallbackPolicy | None = None
    # Open-type properties the app set (the notification type is open in Graph): a JSON object,
    # encoded, whose names never collide with the properties above (api/schemas.py checks).
    extra: bytes | None = None


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """A stored notification: the app's content plus server-managed state.

    `app` is the owning app's host name (its cross-device identity); the feed is partitioned by
    (user_id, app). `version` increases on every change and is the ETag.
    """

    id: str
    user_id: str
    app: str
    app_notification_id: str
    target_host_name: str
    group_name: str | None
    payload: Payload
    target_policy: TargetPolicy
    priority: Priority
    display_time_to_live: int | None
    expiration_date_time: datetime
    fallback_policy: FallbackPolicy | None
    created_date_time: datetime
    last_modified_date_time: datetime
    read_state: ReadState = ReadState.UNREAD
    user_action_state: UserActionState = UserActionState.NONE
    version: int = 1
    extra: bytes | None = None  # open-type properties, as in `Content`


class StatePatch(msgspec.Struct, frozen=True, kw_only=True):
    """A PATCH: any field left as None is unchanged. Content fields only from the owning app."""

    read_state: ReadState | None = None
    user_action_state: UserActionState | None = None
    group_name: str | None = None
    payload: Payload | None = None
    priority: Priority | None = None
    display_time_to_live: int | None = None
    expiration_date_time: datetime | None = None
    # Open-type properties to set: a JSON object, encoded; a null value removes that property.
    # Merged into the stored ones, the result may take at most `max_extra_bytes` (0: no limit).
    extra: bytes | None = None
    max_extra_bytes: int = 0


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a user's change log. Positions are per user, gap-free and strictly ordered.

    `notification` is the state after the change for created/updated, None for deleted/expired
    (a tombstone).
    """

    user_id: str
    position: int
    kind: ChangeKind
    app: str
    notification_id: str
    at: datetime
    notification: Notification | None = None
    # The subscription (device) that made the change, if it said so; its own live stream skips it.
    origin: str | None = None
    # An UPDATED change that replaced the content (a POST with an existing appNotificationId):
    # push channels alert again for it; any other update is a silent state sync.
    replaced: bool = False


class App(msgspec.Struct, frozen=True, kw_only=True):
    """A registered app as one of its client ids sees it.

    An app is its host name (= targetHostName, its cross-device identity); it has one or more
    OAuth client ids (one per platform of a cross-device app), each with its own secret hash
    and an optional platform label, and all of them act as the same app. `created_date_time`
    is when this client id was added.
    """

    client_id: str
    host_name: str
    display_name: str
    secret_hash: str
    created_date_time: datetime
    platform: str | None = None


class DevicePlatform(enum.StrEnum):
    """What a subscription is. The first four match `Platform` (targetPolicy filters them);
    `live` is a client that only takes the live stream (a CLI, a server-side consumer) and is
    never filtered out by a target policy."""

    WINDOWS = "windows"
    IOS = "iOS"
    ANDROID = "android"
    WEBPUSH = "webPush"
    LIVE = "live"


class WebPushKeys(msgspec.Struct, frozen=True):
    p256dh: str
    auth: str


class WebPushChannel(msgspec.Struct, frozen=True, tag="webPush"):
    """A browser PushSubscription (its `toJSON()` shape)."""

    endpoint: str
    keys: WebPushKeys

    @property
    def key(self) -> str:
        return self.endpoint


class ApnsChannel(msgspec.Struct, frozen=True, tag="iOS", rename="camel"):
    device_token: str

    @property
    def key(self) -> str:
        return self.device_token


class FcmChannel(msgspec.Struct, frozen=True, tag="android", rename="camel"):
    registration_token: str

    @property
    def key(self) -> str:
        return self.registration_token


class WnsChannel(msgspec.Struct, frozen=True, tag="windows", rename="camel"):
    channel_uri: str

    @property
    def key(self) -> str:
        return self.channel_uri


PushChannel = WebPushChannel | ApnsChannel | FcmChannel | WnsChannel


class DeliveryState(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """How pushes to a subscription's channel have gone (all None/0 until the first attempt).

    `gone_date_time` is set when the push service said the channel no longer exists; nothing
    more is pushed to it until the device registers a channel again (which clears this state).
    """

    last_delivered_date_time: datetime | None = None
    consecutive_failures: int = 0
    last_error: str | None = None
    gone_date_time: datetime | None = None


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    """One app client on one device of one user. Its `id` is the UNS ID.

    `push_channel` is how to reach the device when it is not connected (None: live only).
    Past `expiration_date_time` the subscription is treated as absent and receives nothing.
    `seen_position` is the newest change position the device is known to have fetched (by a
    delta call or its live stream naming this subscription); the iOS fallback checks it.
    """

    id: str
    user_id: str
    app: str
    platform: DevicePlatform
    display_name: str | None
    push_channel: PushChannel | None
    expiration_date_time: datetime
    created_date_time: datetime
    last_modified_date_time: datetime
    delivery: DeliveryState = DeliveryState()
    seen_position: int = 0


class Pending(msgspec.Struct, frozen=True):
    """An outbox entry not yet dispatched: its sequence number and the change it announces.
    `pushable`: False if the change's (user, app) had no push target when the entry was read
    (no `Outbox.push_targets` to ask); a backend that does not tell says True."""

    seq: int
    change: Change
    pushable: bool = True


# -- push deliveries ----------------------------------------------------------------------------


class Provider(enum.StrEnum):
    """A push service. Each has its own queue and concurrency, so a slow one stalls no other."""

    WEBPUSH = "webPush"
    APNS = "apns"
    FCM = "fcm"
    WNS = "wns"


PROVIDER_OF: dict[type, Provider] = {
    WebPushChannel: Provider.WEBPUSH,
    ApnsChannel: Provider.APNS,
    FcmChannel: Provider.FCM,
    WnsChannel: Provider.WNS,
}


class PushKind(enum.StrEnum):
    """What a push tells the device."""

    ALERT = "alert"  # a new (or replaced) notification: show it / hand the raw content over
    SYNC = "sync"  # its state or content changed elsewhere: update silently
    REMOVE = "remove"  # it was deleted: take it off the notification centre
    FALLBACK = "fallback"  # iOS: the fallback visual, unless the device fetched the raw one


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """What one delivery sends; each channel renders it for its platform when sending.

    `payload` is the notification's content (for FALLBACK: the fallback visual only; for
    REMOVE: None). `expires` is the notification's expiration: nothing is sent or retried after
    it, and it sets the platform TTL.
    """

    kind: PushKind
    notification_id: str
    app_notification_id: str
    position: int
    group_name: str | None = None
    payload: Payload | None = None
    priority: Priority = Priority.NONE
    read_state: ReadState = ReadState.UNREAD
    user_action_state: UserActionState = UserActionState.NONE
    display_time_to_live: int | None = None
    expires: datetime


class NewDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A push to enqueue: `message` for the channel of `subscription_id`, first tried at `due`."""

    subscription_id: str
    user_id: str
    app: str
    provider: Provider
    message: Message
    due: datetime


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed delivery, with its subscription's current channel and fetch position.

    `attempts` counts attempts including this one (the claim made it).
    """

    id: int
    subscription_id: str
    user_id: str
    app: str
    provider: Provider
    channel: PushChannel
    message: Message
    attempts: int
    seen_position: int
    created: datetime


class Settle(enum.StrEnum):
    DONE = "done"  # sent (or no longer needed): remove; a sent one resets the failure count
    RETRY = "retry"  # try again at `due`
    DROP = "drop"  # rejected or out of attempts: remove, count a failure
    GONE = "gone"  # the channel no longer exists: remove, mark the subscription gone


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one claimed delivery, as the store records it.

    `sent`: DONE because the push service accepted it (updates last_delivered; a DONE without
    sending, e.g. a fallback the device no longer needs, leaves the subscription as it is).
    `error` is a short reason recorded on the subscription (DROP, GONE, RETRY): printable text
    only, at most 300 characters.
    """

    id: int
    subscription_id: str
    settle: Settle
    # The claim this settles (the delivery's `attempts` when claimed) and the channel it was
    # sent to: a settlement for an older claim, or for a channel the device has since replaced,
    # must not undo newer state.
    attempts: int
    channel_key: str
    sent: bool = False
    due: datetime | None = None
    error: str | None = None
