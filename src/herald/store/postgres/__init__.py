"""The PostgreSQL store: an asyncpg pool, a few batching writer tasks, one statement per put
batch.

One object (`PostgresStore`) made of one part per concern of the contract, each in its own
module and each a subclass of `PostgresWriter` (writer.py: pool, writer tasks, readiness). A call
goes straight from its part to the writer: no layer between them, so the put path costs what it
did in one class. The server-side functions are kept in functions/ and applied at open
(schema.py).
"""

from herald.store.postgres.audiences import PostgresAudiences
from herald.store.postgres.changefeed import PostgresChangeFeed
from herald.store.postgres.changelog import PostgresChangeLog
from herald.store.postgres.credentials import PostgresPushCredentials
from herald.store.postgres.deliveries import PostgresDeliveryQueue
from herald.store.postgres.directory import PostgresDirectory
from herald.store.postgres.idempotency import PostgresIdempotency
from herald.store.postgres.issuance import PostgresIssuance
from herald.store.postgres.notifications import PostgresNotifications
from herald.store.postgres.outbox import PostgresOutbox
from herald.store.postgres.preferences import PostgresPreferences
from herald.store.postgres.retention import PostgresRetention
from herald.store.postgres.shards import PostgresShards
from herald.store.postgres.subscriptions import PostgresSubscriptions
from herald.store.postgres.webhooks import PostgresWebhooks

__all__ = ["PostgresStore"]


class PostgresStore(
    PostgresDirectory,
    PostgresNotifications,
    PostgresChangeLog,
    PostgresRetention,
    PostgresOutbox,
    PostgresShards,
    PostgresSubscriptions,
    PostgresDeliveryQueue,
    PostgresPushCredentials,
    PostgresIdempotency,
    PostgresIssuance,
    PostgresPreferences,
    PostgresChangeFeed,
    PostgresWebhooks,
    PostgresAudiences,
):
    """Herald's state in one PostgreSQL database (`herald.store.Store`)."""
