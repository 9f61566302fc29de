"""Quiet-hours arithmetic (herald/preferences.py; docs/api.md "Notification preferences"): local
wall-clock periods in an IANA time zone, across midnight, by the day they start on, through
daylight saving changes."""

from __future__ import annotations

from datetime import UTC, datetime, time

from herald.model import DevicePlatform, Message, Priority, PushKind
from herald.preferences import (
    Decision,
    NotificationPreferences,
    QuietHours,
    quiet_period_end,
    quiet_until,
    verdict,
)

BERLIN = "Europe/Berlin"  # UTC+1 in winter, UTC+2 in summer


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def quiet(start: int, end: int, days: tuple[int, ...] = tuple(range(7))) -> QuietHours:
    return QuietHours(time_zone=BERLIN, start=time(start), end=time(end), days=days)


def test_a_period_across_midnight_in_the_users_zone() -> None:
    q = quiet(22, 7)  # Berlin 22:00-07:00 = 21:00-06:00 UTC in January
    assert quiet_until(q, utc(2027, 1, 12, 20, 59)) is None
    assert quiet_until(q, utc(2027, 1, 12, 21, 0)) == utc(2027, 1, 13, 6, 0)
    assert quiet_until(q, utc(2027, 1, 13, 2, 0)) == utc(2027, 1, 13, 6, 0)  # after midnight
    assert quiet_until(q, utc(2027, 1, 13, 6, 0)) is None  # the end is not quiet


def test_a_period_within_one_day() -> None:
    q = quiet(13, 15)
    assert quiet_until(q, utc(2027, 1, 12, 12, 30)) == utc(2027, 1, 12, 14, 0)
    assert quiet_until(q, utc(2027, 1, 12, 14, 30)) is None


def test_days_are_the_days_a_period_starts_on() -> None:
    q = quiet(23, 9, days=(4,))  # Fridays 23:00 to Saturday 09:00
    friday_night = utc(2027, 1, 15, 22, 30)  # Friday 23:30 in Berlin
    saturday_morning = utc(2027, 1, 16, 7, 0)  # Saturday 08:00
    saturday_night = utc(2027, 1, 16, 22, 30)
    assert quiet_until(q, friday_night) == utc(2027, 1, 16, 8, 0)
    assert quiet_until(q, saturday_morning) == utc(2027, 1, 16, 8, 0)
    assert quiet_until(q, saturday_night) is None
    assert quiet_until(q, utc(2027, 1, 14, 22, 30)) is None  # Thursday night


def test_daylight_saving_time_follows_the_wall_clock() -> None:
    q = quiet(22, 7)
    # The night of 27/28 March 2027 (clocks go forward at 02:00): 22:00 is UTC+1, 07:00 UTC+2.
    assert quiet_until(q, utc(2027, 3, 27, 23, 0)) == utc(2027, 3, 28, 5, 0)
    # In summer both ends are UTC+2.
    assert quiet_until(q, utc(2027, 7, 1, 1, 0)) == utc(2027, 7, 1, 5, 0)


def message(kind: PushKind = PushKind.ALERT, **kw: object) -> Message:
    fields: dict[str, object] = {
        "kind": kind,
        "notification_id": "n",
        "app_notification_id": "a",
        "position": 1,
        "expires": utc(2030, 1, 1),
    }
    return Message(**(fields | kw))  # type: ignore[arg-type]


def test_the_verdict_on_each_kind_of_push() -> None:
    prefs = NotificationPreferences(
        muted_groups=("promo",),
        muted_platforms=(DevicePlatform.IOS,),
        quiet_hours=QuietHours(
            time_zone="UTC", start=time(22), end=time(7), allow_high_priority=True
        ),
    )
    night, day = utc(2027, 1, 12, 23), utc(2027, 1, 12, 12)
    web = DevicePlatform.WEBPUSH
    end = quiet_period_end(prefs, night)
    assert end == utc(2027, 1, 13, 7) and quiet_period_end(prefs, day) is None
    assert verdict(prefs, message(), web, None) is Decision.SEND
    assert verdict(prefs, message(), web, end) is Decision.HOLD
    assert verdict(prefs, message(priority=Priority.HIGH), web, end) is Decision.SEND
    assert verdict(prefs, message(PushKind.FALLBACK), web, end) is Decision.DROP
    assert verdict(prefs, message(group_name="promo"), web, None) is Decision.DROP
    assert verdict(prefs, message(), DevicePlatform.IOS, None) is Decision.DROP
    for silent in (PushKind.SYNC, PushKind.REMOVE):  # never filtered
        assert verdict(prefs, message(silent), DevicePlatform.IOS, end) is Decision.SEND
        assert verdict(prefs, message(silent, group_name="promo"), web, end) is Decision.SEND
