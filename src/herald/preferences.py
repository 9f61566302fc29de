"""A user's notification preferences for one app (docs/api.md, "notificationPreferences"), and
what they make of an alerting push (docs/push.md, "Preferences and quiet hours").

Pure: parsing and checking the resource's body, and `verdict`, which the dispatcher asks for
each alerting push of a user who has preferences. Only alerting pushes are affected; the feed,
delta and the live streams are not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from herald import fields
from herald.errors import InvalidRequest
from herald.model import DevicePlatform, Message, Priority, PushKind

MAX_MUTED_GROUPS = 100
MAX_GROUP_LENGTH = 256  # as a notification's groupName
MAX_ZONE_LENGTH = 64
# The platforms that have push channels (a `live` subscription has none).
PUSH_PLATFORMS: dict[str, DevicePlatform] = {
    p.value.lower(): p for p in DevicePlatform if p is not DevicePlatform.LIVE
}
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
ALERTING = (PushKind.ALERT, PushKind.FALLBACK)


class QuietHours(msgspec.Struct, frozen=True, kw_only=True):
    """A daily quiet period in the user's time zone, from `start` to `end` local time (crossing
    midnight when end <= start); `days`: the weekdays (0 = Monday) a period may *start* on."""

    time_zone: str
    start: time
    end: time
    days: tuple[int, ...] = tuple(range(7))
    allow_high_priority: bool = False


class NotificationPreferences(msgspec.Struct, frozen=True, kw_only=True):
    muted_groups: tuple[str, ...] = ()
    muted_platforms: tuple[DevicePlatform, ...] = ()
    quiet_hours: QuietHours | None = None


class StoredPreferences(msgspec.Struct, frozen=True, kw_only=True):
    """Preferences as stored: `version` counts writes (the ETag); 0 means never set."""

    preferences: NotificationPreferences
    version: int
    last_modified_date_time: datetime | None


class HeldPush(msgspec.Struct, frozen=True, kw_only=True):
    """An alerting push held during quiet hours until `release` (see `Preferences` in the
    store contract)."""

    subscription_id: str
    user_id: str
    app: str
    provider: str
    notification_id: str
    position: int
    expires: datetime
    release: datetime


class HeldSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What one subscription had held when its quiet period ended: how many notifications are
    still worth telling about (unexpired, unread, not dismissed or activated)."""

    subscription_id: str
    user_id: str
    app: str
    provider: str
    count: int
    position: int  # the newest of them
    expires: datetime  # the latest expiration of them


class Decision(enum.Enum):
    SEND = "send"
    DROP = "drop"
    HOLD = "hold"


def verdict(
    prefs: NotificationPreferences,
    message: Message,
    platform: DevicePlatform,
    quiet_end: datetime | None,
) -> Decision:
    """What to do with one push to a device of `platform`: send it, drop it (muted), or hold it
    until `quiet_end` (the end of the quiet period now falls in, from `quiet_period_end`; None:
    not in one). Silent pushes (sync, remove) are always sent: they only keep the device's state
    right."""
    if message.kind not in ALERTING:
        return Decision.SEND
    if platform in prefs.muted_platforms or (
        message.group_name is not None and message.group_name in prefs.muted_groups
    ):
        return Decision.DROP
    quiet = prefs.quiet_hours
    if quiet_end is None or quiet is None:
        return Decision.SEND
    if quiet.allow_high_priority and message.priority is Priority.HIGH:
        return Decision.SEND
    # One summary replaces them all: an iOS fallback of a held alert is not held too.
    return Decision.HOLD if message.kind is PushKind.ALERT else Decision.DROP


def quiet_period_end(prefs: NotificationPreferences, now: datetime) -> datetime | None:
    """The end (UTC) of the quiet period `now` falls in, if the preferences have one."""
    return None if prefs.quiet_hours is None else quiet_until(prefs.quiet_hours, now)


def quiet_until(quiet: QuietHours, now: datetime) -> datetime | None:
    """The end (UTC) of the quiet period `now` falls in, or None if it falls in none."""
    zone = ZoneInfo(quiet.time_zone)
    today = now.astimezone(zone).date()
    for day in (today - timedelta(days=1), today):
        if day.weekday() not in quiet.days:
            continue
        start, end = _period(quiet, day, zone)
        if start <= now < end:
            return end
    return None


def _period(quiet: QuietHours, day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The period starting on local `day`, in UTC (wall-clock times: a DST change makes it an
    hour shorter or longer)."""
    end_day = day if quiet.end > quiet.start else day + timedelta(days=1)
    start = datetime.combine(day, quiet.start, tzinfo=zone).astimezone(UTC)
    return start, datetime.combine(end_day, quiet.end, tzinfo=zone).astimezone(UTC)


def summaries(
    held: Sequence[tuple[str, str, str, str, str, int, datetime]],
    live: set[str],
    reachable: set[str],
) -> list[HeldSummary]:
    """Per reachable subscription, its held pushes of live notifications, counted once each.
    `held`: (subscription, user, app, provider, notification, position, expires) rows."""
    found: dict[str, tuple[tuple[str, str, str, str], set[str], int, datetime]] = {}
    for sub, user, app, provider, nid, position, expires in held:
        if nid not in live or sub not in reachable:
            continue
        head, ids, newest, latest = found.get(sub, ((sub, user, app, provider), set(), 0, expires))
        ids.add(nid)
        found[sub] = (head, ids, max(newest, position), max(latest, expires))
    return [
        HeldSummary(
            subscription_id=head[0],
            user_id=head[1],
            app=head[2],
            provider=head[3],
            count=len(ids),
            position=newest,
            expires=latest,
        )
        for head, ids, newest, latest in found.values()
    ]


# -- the resource's body --------------------------------------------------------------------------


class PreferencesIn(msgspec.Struct, forbid_unknown_fields=True):
    """A PATCH body: absent fields are kept; lenient on types (each is checked below)."""

    mutedGroups: Any = msgspec.UNSET
    mutedPlatforms: Any = msgspec.UNSET
    quietHours: Any = msgspec.UNSET
    odata_context: Any = msgspec.field(default=None, name="@odata.context")
    odata_etag: Any = msgspec.field(default=None, name="@odata.etag")
    lastModifiedDateTime: Any = None


def patched(current: NotificationPreferences, body: PreferencesIn) -> NotificationPreferences:
    """`current` with the fields `body` gives replaced; InvalidRequest names the first bad one."""
    if body.lastModifiedDateTime is not None:
        raise InvalidRequest("'lastModifiedDateTime' is read-only.", target="lastModifiedDateTime")
    out = current
    if body.mutedGroups is not msgspec.UNSET:
        out = msgspec.structs.replace(out, muted_groups=muted_groups(body.mutedGroups))
    if body.mutedPlatforms is not msgspec.UNSET:
        out = msgspec.structs.replace(out, muted_platforms=muted_platforms(body.mutedPlatforms))
    if body.quietHours is not msgspec.UNSET:
        out = msgspec.structs.replace(out, quiet_hours=quiet_hours(body.quietHours))
    return out


def muted_groups(value: Any) -> tuple[str, ...]:
    items = _list(value, "mutedGroups")
    if len(items) > MAX_MUTED_GROUPS:
        raise InvalidRequest(
            f"'mutedGroups' may hold at most {MAX_MUTED_GROUPS} group names.", target="mutedGroups"
        )
    names = [fields.required(v, "mutedGroups", MAX_GROUP_LENGTH) for v in items]
    return tuple(dict.fromkeys(names))


def muted_platforms(value: Any) -> tuple[DevicePlatform, ...]:
    out = []
    for item in _list(value, "mutedPlatforms"):
        found = PUSH_PLATFORMS.get(item.lower()) if isinstance(item, str) else None
        if found is None:
            names = ", ".join(p.value for p in PUSH_PLATFORMS.values())
            raise InvalidRequest(
                f"'mutedPlatforms' holds {str(item)[:32]!r}, which is not a push platform"
                f" ({names}).",
                target="mutedPlatforms",
            )
        out.append(found)
    return tuple(dict.fromkeys(out))


QUIET_FIELDS = ("timeZone", "startTime", "endTime", "daysOfWeek", "allowHighPriority")


def quiet_hours(value: Any) -> QuietHours | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("'quietHours' must be an object or null.", target="quietHours")
    for name in value:
        if name not in QUIET_FIELDS:
            raise InvalidRequest(
                f"'quietHours' has no property {str(name)[:32]!r}.", target=f"quietHours/{name}"
            )
    start = _time(value.get("startTime"), "quietHours/startTime")
    end = _time(value.get("endTime"), "quietHours/endTime")
    if start == end:
        raise InvalidRequest(
            "'quietHours/startTime' and 'endTime' must differ.", target="quietHours/endTime"
        )
    high = value.get("allowHighPriority", False)
    if not isinstance(high, bool):
        raise InvalidRequest(
            "'quietHours/allowHighPriority' must be true or false.",
            target="quietHours/allowHighPriority",
        )
    return QuietHours(
        time_zone=_zone(value.get("timeZone")),
        start=start,
        end=end,
        days=_days(value.get("daysOfWeek")),
        allow_high_priority=high,
    )


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"'{field}' must be an array.", target=field)
    return value


def _zone(value: Any) -> str:
    name = fields.required(value, "quietHours/timeZone", MAX_ZONE_LENGTH)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequest(
            f"'quietHours/timeZone' {name[:64]!r} is not an IANA time zone name"
            " (such as 'Europe/Berlin').",
            target="quietHours/timeZone",
        ) from exc
    return name


def _time(value: Any, field: str) -> time:
    """A local time "HH:MM" or "HH:MM:SS" (Graph's timeOfDay, fractions of a second ignored)."""
    text = fields.required(value, field, 16)
    parts = text.split(".", 1)[0].split(":")
    ok = len(parts) in (2, 3) and all(len(p) == 2 and p.isascii() and p.isdigit() for p in parts)
    numbers = [int(p) for p in parts] if ok else []
    if not ok or numbers[0] > 23 or numbers[1] > 59 or (len(numbers) == 3 and numbers[2] > 59):
        raise InvalidRequest(f"'{field}' must be a time of day such as '22:00'.", target=field)
    return time(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 0)


def _days(value: Any) -> tuple[int, ...]:
    if value is None:
        return tuple(range(7))
    items = _list(value, "quietHours/daysOfWeek")
    out = set()
    for item in items:
        if not isinstance(item, str) or item.lower() not in DAYS:
            raise InvalidRequest(
                f"'quietHours/daysOfWeek' holds {str(item)[:32]!r}, which is not a day of the week"
                " ('monday' … 'sunday').",
                target="quietHours/daysOfWeek",
            )
        out.add(DAYS.index(item.lower()))
    if not out:
        raise InvalidRequest(
            "'quietHours/daysOfWeek' must name at least one day (or be left out: every day).",
            target="quietHours/daysOfWeek",
        )
    return tuple(sorted(out))


# -- the resource as returned ---------------------------------------------------------------------


def quiet_out(q: QuietHours) -> dict[str, Any]:
    return {
        "timeZone": q.time_zone,
        "startTime": q.start.isoformat(),
        "endTime": q.end.isoformat(),
        "daysOfWeek": [DAYS[d] for d in q.days],
        "allowHighPriority": q.allow_high_priority,
    }


def document(stored: StoredPreferences) -> dict[str, Any]:
    p = stored.preferences
    return {
        "mutedGroups": list(p.muted_groups),
        "mutedPlatforms": [m.value for m in p.muted_platforms],
        "quietHours": quiet_out(p.quiet_hours) if p.quiet_hours is not None else None,
        "lastModifiedDateTime": stored.last_modified_date_time,
    }


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(NotificationPreferences)


def encode(prefs: NotificationPreferences) -> str:
    """As a store keeps it."""
    return _ENCODER.encode(prefs).decode()


def decode(text: str | bytes) -> NotificationPreferences:
    return _DECODER.decode(text)
