"""The schema both backends share: the numbered migrations of each dialect, the check that
refuses a database newer than this code, and the order in which `delete_app` empties the tables."""

from __future__ import annotations

from importlib import resources

from herald.errors import HeraldError


class SchemaTooNew(HeraldError):
    """The database was migrated by a newer Herald; opening it could corrupt it."""


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, sql) of every packaged migration for `dialect`, ascending."""
    folder = resources.files("herald.store").joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


def check_version(current: int, known: int) -> None:
    if current > known:
        raise SchemaTooNew(
            f"database schema version {current} is newer than this Herald knows ({known});"
            " upgrade Herald or use another database"
        )


# The idempotency scope of a send's recipients' records is this and the send's id
# (herald/sends.py); no request's scope (`{client id}:{user}`) starts with a colon.
SEND_SCOPE = ":send:"

# What `delete_app` removes, in this order (outbox entries and deliveries before the changes and
# subscriptions they refer to; client ids last: idempotency scopes are found through them). Each
# statement takes the host name as its only parameter, `{p}` its placeholder.
DELETE_APP = (
    (
        "outbox",
        "DELETE FROM outbox WHERE EXISTS (SELECT 1 FROM changes AS c WHERE c.app = {p}"
        " AND c.user_id = outbox.user_id AND c.position = outbox.position)",
    ),
    ("deliveries", "DELETE FROM deliveries WHERE app = {p}"),
    ("heldPushes", "DELETE FROM held_pushes WHERE app = {p}"),
    ("notificationPreferences", "DELETE FROM notification_preferences WHERE app = {p}"),
    ("changes", "DELETE FROM changes WHERE app = {p}"),
    ("changeFeed", "DELETE FROM app_changes WHERE app = {p}"),
    ("changeFeedEnabled", "DELETE FROM app_feeds WHERE app = {p}"),
    ("webhooks", "DELETE FROM webhooks WHERE app = {p}"),
    ("notifications", "DELETE FROM notifications WHERE app = {p}"),
    ("subscriptions", "DELETE FROM subscriptions WHERE app = {p}"),
    ("pushCredentials", "DELETE FROM push_credentials WHERE app = {p}"),
    (
        "idempotencyKeys",
        "DELETE FROM idempotency WHERE EXISTS (SELECT 1 FROM app_clients AS a"
        " WHERE a.host_name = {p}"
        " AND substr(idempotency.scope, 1, length(a.client_id) + 1) = a.client_id || ':')",
    ),
    # Sends (docs/api.md "Audiences"): their recipients' idempotency records first (found
    # through the sends), then the sends, then the audiences.
    (
        "sendRecords",
        "DELETE FROM idempotency WHERE EXISTS (SELECT 1 FROM sends AS s WHERE s.app = {p}"
        f" AND idempotency.scope = '{SEND_SCOPE}' || s.id)",
    ),
    (
        "sendRecipients",
        "DELETE FROM send_recipients WHERE EXISTS (SELECT 1 FROM sends AS s WHERE s.app = {p}"
        " AND s.id = send_recipients.send_id)",
    ),
    (
        "sendFailures",
        "DELETE FROM send_failures WHERE EXISTS (SELECT 1 FROM sends AS s WHERE s.app = {p}"
        " AND s.id = send_failures.send_id)",
    ),
    ("sends", "DELETE FROM sends WHERE app = {p}"),
    ("audienceMembers", "DELETE FROM audience_members WHERE app = {p}"),
    ("audiences", "DELETE FROM audiences WHERE app = {p}"),
    ("clientIds", "DELETE FROM app_clients WHERE host_name = {p}"),
    ("apps", "DELETE FROM apps WHERE host_name = {p}"),
)


# Why `remove_client` refuses an app's last client id.
LAST_CLIENT = "this is the app's last client id: remove the app instead (herald app delete)"
