"""The SQLite store: stdlib `sqlite3`, WAL, group commit on the event loop.

One object (`SqliteStore`) made of one part per concern of the contract, each in its own module
and each a subclass of `SqliteDatabase` (database.py: connections, reads, readiness), itself a
`SqliteWriter` (writer.py: group commit). A call goes straight from its part to the writer: no
layer between them, so the put path costs what it did in one class.
"""

from herald.store.sqlite.audiences import SqliteAudiences
from herald.store.sqlite.changefeed import SqliteChangeFeed
from herald.store.sqlite.changelog import SqliteChangeLog
from herald.store.sqlite.credentials import SqlitePushCredentials
from herald.store.sqlite.deliveries import SqliteDeliveryQueue
from herald.store.sqlite.directory import SqliteDirectory
from herald.store.sqlite.idempotency import SqliteIdempotency
from herald.store.sqlite.issuance import SqliteIssuance
from herald.store.sqlite.notifications import SqliteNotifications
from herald.store.sqlite.outbox import SqliteOutbox
from herald.store.sqlite.preferences import SqlitePreferences
from herald.store.sqlite.retention import SqliteRetention
from herald.store.sqlite.shards import SqliteShards
from herald.store.sqlite.subscriptions import SqliteSubscriptions
from herald.store.sqlite.webhooks import SqliteWebhooks

__all__ = ["SqliteStore"]


class SqliteStore(
    SqliteDirectory,
    SqliteNotifications,
    SqliteChangeLog,
    SqliteRetention,
    SqliteOutbox,
    SqliteShards,
    SqliteSubscriptions,
    SqliteDeliveryQueue,
    SqlitePushCredentials,
    SqliteIdempotency,
    SqliteIssuance,
    SqlitePreferences,
    SqliteChangeFeed,
    SqliteWebhooks,
    SqliteAudiences,
):
    """Herald's state in one SQLite database (`herald.store.Store`)."""
