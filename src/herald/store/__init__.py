"""Durable state: the store's contract (one Protocol per concern, `Store` their union) and its
SQLite and PostgreSQL implementations."""

from herald.settings import Settings
from herald.store.contract import (
    SHARDS,
    Audience,
    Audiences,
    ChangeFeed,
    ChangeLog,
    DeliveryQueue,
    Directory,
    Failure,
    FeedPage,
    Idempotency,
    Issuance,
    Notifications,
    Once,
    Outbox,
    Preferences,
    PushCredentials,
    Remembered,
    Retention,
    Send,
    Shards,
    Store,
    Subscriptions,
    Webhook,
    Webhooks,
)

__all__ = [
    "ChangeFeed",
    "Audience",
    "Audiences",
    "Failure",
    "Send",
    "ChangeLog",
    "DeliveryQueue",
    "Directory",
    "FeedPage",
    "Idempotency",
    "Issuance",
    "Notifications",
    "Once",
    "Outbox",
    "Preferences",
    "PushCredentials",
    "Remembered",
    "Retention",
    "SHARDS",
    "Shards",
    "Store",
    "Subscriptions",
    "Webhook",
    "Webhooks",
    "open_store",
]


def open_store(url: str, settings: Settings | None = None) -> Store:
    """Pick the implementation by URL scheme: sqlite:///path, sqlite://:memory:, postgresql://...
    `settings`: where the store's own options come from (sqlite_*, postgres_*); defaults if
    None."""
    if url.startswith("sqlite:"):
        from herald.store.sqlite import SqliteStore

        return SqliteStore(url, settings)
    if url.startswith(("postgresql:", "postgres:")):
        from herald.store.postgres import PostgresStore

        if settings is None:
            return PostgresStore(url)
        return PostgresStore(
            url,
            connect_timeout=settings.postgres_connect_timeout,
            statement_timeout=settings.postgres_statement_timeout,
        )
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
