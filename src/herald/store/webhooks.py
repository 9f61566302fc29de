"""What both stores share about webhooks: the row's columns and how a row becomes a `Webhook`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from herald.store.contract import Webhook

# Column order of every `SELECT {WEBHOOK_COLUMNS}`; `webhook_from_row` relies on it.
WEBHOOK_COLUMNS = (
    "id, app, url, secret, kinds, status, cursor, created_date_time, last_modified_date_time,"
    " failures, failing_since, next_attempt, last_attempt, last_success, last_status, last_error"
)


def webhook_from_row(r: Sequence[Any], to_dt: Callable[[Any], datetime]) -> Webhook:
    def maybe(v: Any) -> datetime | None:
        return None if v is None else to_dt(v)

    return Webhook(
        id=r[0],
        app=r[1],
        url=r[2],
        secret=r[3],
        kinds=tuple(k for k in r[4].split(",") if k),
        status=r[5],
        cursor=int(r[6]),
        created=to_dt(r[7]),
        last_modified=to_dt(r[8]),
        failures=int(r[9]),
        failing_since=maybe(r[10]),
        next_attempt=maybe(r[11]),
        last_attempt=maybe(r[12]),
        last_success=maybe(r[13]),
        last_status=r[14],
        last_error=r[15],
    )
