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


class StatePatch(msgspec.Struct, frozen=True, kw_only=True):
    """A PATCH: any field left as None is unchanged. Content fields only from the owning app."""

    read_state: ReadState | None = None
    user_action_state: UserActionState | None = None
    group_name: str | None = None
    payload: Payload | None = None
    priority: Priority | None = None
    display_time_to_live: int | None = None
    expiration_date_time: datetime | None = None


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


class App(msgspec.Struct, frozen=True, kw_only=True):
    """A registered app: its OAuth client id, its host name (= targetHostName) and secret hash."""

    client_id: str
    host_name: str
    display_name: str
    secret_hash: str
    created_date_time: datetime


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


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    """One app client on one device of one user. Its `id` is the UNS ID.

    `push_channel` is how to reach the device when it is not connected (None: live only).
    Past `expiration_date_time` the subscription is treated as absent and receives nothing.
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


class Pending(msgspec.Struct, frozen=True):
    """An outbox entry not yet dispatched: its sequence number and the change it announces."""

    seq: int
    change: Change
