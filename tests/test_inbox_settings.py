"""The inbox's notification settings panel (docs/inbox.md, "Notification settings") in headless
Chromium against a real `herald serve`: what one device saves is what the API has and what
another device of the user shows; what Herald refuses is said on the page and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser import Api, Browser, Herald, Inbox, expect, http_error, signed_in

PREFS = "/beta/me/notificationPreferences"


@pytest.fixture(scope="module")
def herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Herald]:
    server = Herald(tmp_path_factory.mktemp("inbox-settings"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def open_settings(inbox: Inbox) -> None:
    inbox.page.locator("#settings > summary").click()
    expect(inbox.page.locator("#settings-state")).to_have_attribute("data-state", "loaded")


def save(inbox: Inbox, state: str) -> None:
    inbox.page.get_by_role("button", name="Save settings").click()
    expect(inbox.page.locator("#settings-state")).to_have_attribute("data-state", state)


def test_settings_are_saved_shown_on_another_device_and_refused_when_bad(
    herald: Herald, api: Api, browser: Browser
) -> None:
    laptop = signed_in(browser.device("laptop"), herald, api.app, api.user)
    open_settings(laptop)
    page = laptop.page
    # Never set: nothing muted, quiet hours off, the browser's own time zone offered.
    expect(page.locator("#muted-groups")).to_have_value("")
    expect(page.locator("#quiet-enabled")).not_to_be_checked()
    zone = page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone")
    expect(page.locator("#quiet-zone")).to_have_value(zone)
    laptop.shot("1-settings-empty")

    page.locator("#muted-groups").fill("promotions, news ,")
    page.get_by_label("iOS").check()
    page.get_by_label("Hold alerts during quiet hours").check()
    page.locator("#quiet-start").fill("23:00")
    page.locator("#quiet-end").fill("06:30")
    page.locator("#quiet-zone").fill("Europe/Berlin")
    page.get_by_label("Let high-priority notifications through").check()
    save(laptop, "saved")
    expect(page.locator("#settings-state")).to_have_text("Saved.")
    laptop.shot("2-saved")
    r = api.me.get(PREFS)
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == 'W/"1"'
    stored = r.json()
    assert stored["mutedGroups"] == ["promotions", "news"]
    assert stored["mutedPlatforms"] == ["iOS"]
    assert stored["quietHours"] == {
        "timeZone": "Europe/Berlin",
        "startTime": "23:00:00",
        "endTime": "06:30:00",
        "daysOfWeek": [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ],
        "allowHighPriority": True,
    }

    # A time zone Herald does not know: the page says why; nothing changed on the server.
    laptop.device.allow(http_error(400, PREFS + "$"))
    page.locator("#quiet-zone").fill("Mars/Olympus")
    save(laptop, "error")
    expect(page.locator("#settings-state")).to_contain_text("Not saved")
    expect(page.locator("#settings-state")).to_contain_text("Mars/Olympus")
    laptop.shot("3-refused")
    assert api.me.get(PREFS).headers["ETag"] == 'W/"1"'

    # Another device of the user shows what the laptop saved.
    phone = signed_in(browser.device("phone"), herald, api.app, api.user)
    open_settings(phone)
    other = phone.page
    expect(other.locator("#muted-groups")).to_have_value("promotions, news")
    expect(other.get_by_label("iOS")).to_be_checked()
    expect(other.get_by_label("Android")).not_to_be_checked()
    expect(other.locator("#quiet-enabled")).to_be_checked()
    expect(other.locator("#quiet-start")).to_have_value("23:00")
    expect(other.locator("#quiet-end")).to_have_value("06:30")
    expect(other.locator("#quiet-zone")).to_have_value("Europe/Berlin")
    expect(other.get_by_label("Let high-priority notifications through")).to_be_checked()
    phone.shot("4-on-the-phone")

    # Turned off from the phone: quiet hours gone, nothing muted.
    other.locator("#muted-groups").fill("")
    other.get_by_label("iOS").uncheck()
    other.get_by_label("Hold alerts during quiet hours").uncheck()
    save(phone, "saved")
    stored = api.me.get(PREFS).json()
    assert (stored["mutedGroups"], stored["mutedPlatforms"], stored["quietHours"]) == ([], [], None)
    browser.check()
