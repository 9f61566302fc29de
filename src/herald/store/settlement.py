"""How a `settle` applies its outcomes (both backends): which deliveries it deletes or retries
and what it does to each subscription's DeliveryState, folded into set-wise writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from herald.model import Settle, Settlement

# A settlement's `error` as stored: printable text (PostgreSQL rejects NUL in text, and a log
# line or admin page must not carry control characters), at most this long.
MAX_ERROR = 300
_INT64 = range(-(2**63), 2**63)


def clean_error(error: object) -> str | None:
    """`error` made safe to store: whitespace controls become spaces, other unprintable
    characters (NUL, controls, lone surrogates) are dropped, and it is cut to MAX_ERROR."""
    if error is None:
        return None
    text = error if isinstance(error, str) else str(error)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " if ch in "\t\n\r\v\f" else "" for ch in text)
    return text[:MAX_ERROR]


def settle_ids(outcomes: Sequence[Settlement]) -> list[int]:
    """The delivery ids the outcomes name, sorted, without any no row can have (not a 64-bit
    integer): binding one would fail the whole settle."""
    return sorted({o.id for o in outcomes if type(o.id) is int and o.id in _INT64})


class Claimed(NamedTuple):
    """A delivery a settle names, as it is now: its subscription, the claims made so far, and
    the subscription's current channel key (None: the subscription is gone or has no channel)."""

    subscription_id: str
    attempts: int
    channel_key: str | None


@dataclass(frozen=True, slots=True)
class SubscriptionOutcome:
    """What a settle does to one subscription's DeliveryState, as one update:

    consecutive_failures = (0 if delivered else consecutive_failures) + failures;
    last_error = error if failures else (None if delivered else last_error);
    last_delivered = now if delivered; gone = now if gone.

    Only while the subscription's channel key is still `key`."""

    id: str
    key: str
    delivered: bool
    failures: int
    error: str | None
    gone: bool


@dataclass(slots=True)
class SettlePlan:
    """The writes of one `settle`, in outcome order folded into set-wise statements."""

    delete: list[int] = field(default_factory=list)  # delivery ids
    retry: dict[int, datetime] = field(default_factory=dict)  # delivery id -> new due
    gone: list[str] = field(default_factory=list)  # subscriptions losing every delivery
    subscriptions: list[SubscriptionOutcome] = field(default_factory=list)  # sorted by id


def settle_plan(outcomes: Sequence[Settlement], found: dict[int, Claimed]) -> SettlePlan:
    """Apply `outcomes` in order to the deliveries `found` (by id).

    An outcome applies only to the claim it answers: it is ignored if its delivery is not
    there (unknown, or removed by an earlier outcome) or has been claimed again since (other
    `attempts`). It changes the subscription's delivery state only if it was for the channel
    the subscription has now; a GONE for an old channel removes its own delivery only."""
    alive = {id: c.subscription_id for id, c in found.items()}
    plan = SettlePlan()
    # Per subscription: [delivered, failures since the last delivery, last error, gone, key].
    state: dict[str, list[Any]] = {}
    for o in outcomes:
        sub = alive.get(o.id)
        if sub is None:
            continue
        claim = found[o.id]
        if claim.attempts != o.attempts:
            continue
        s = None
        if claim.channel_key is not None and claim.channel_key == o.channel_key:
            s = state.setdefault(sub, [False, 0, None, False, claim.channel_key])
        if o.settle is Settle.RETRY:
            if o.due is not None:
                plan.retry[o.id] = o.due if o.due.tzinfo is not None else o.due.replace(tzinfo=UTC)
            if s is not None:
                s[1] += 1
                s[2] = o.error
            continue
        del alive[o.id]
        plan.retry.pop(o.id, None)
        plan.delete.append(o.id)
        if s is None:
            continue
        if o.settle is Settle.DONE:
            if o.sent:
                s[0], s[1], s[2] = True, 0, None
            continue
        s[1] += 1
        s[2] = o.error
        if o.settle is Settle.GONE and not s[3]:
            s[3] = True
            plan.gone.append(sub)
            for other in [i for i, owner in alive.items() if owner == sub]:
                del alive[other]
                plan.retry.pop(other, None)
    plan.subscriptions = [
        SubscriptionOutcome(sub, s[4], s[0], s[1], clean_error(s[2]) if s[1] else None, s[3])
        for sub, s in sorted(state.items())
        if s[0] or s[1] or s[3]
    ]
    return plan
