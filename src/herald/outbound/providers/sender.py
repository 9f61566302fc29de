"""The Sender protocol and what one push attempt comes to (an Outcome), with the usual reading of
a push service's answer that every sender refines."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol

import httpx

from herald.model import Message, PushChannel


class Result(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # a transient failure: try again later (after `retry_after` if given)
    GONE = "gone"  # the channel no longer exists
    REJECTED = "rejected"  # the push service refused this message: never retried


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. `credentials`: the provider refused Herald's credentials (or
    none are configured): an operator has to act, so it is reported loudly."""

    result: Result
    reason: str = ""
    retry_after: float | None = None
    credentials: bool = False
    status: int | None = None


DELIVERED = Outcome(Result.DELIVERED)
MAX_RETRY_AFTER = 86_400.0  # a provider asking for longer is treated as asking for a day


class Sender(Protocol):
    """Sends messages to one provider (push service). Guarantees:

    * `send` renders `message` for its platform (a pure function of the message) and makes one
      request (plus a token request when its cached access token needs renewing).
    * It returns an Outcome for everything the service answers, and for timeouts and connection
      failures (RETRY); it never raises for the service's behaviour.
    * It never logs or returns a credential or token.
    """

    async def send(self, app: str, channel: PushChannel, message: Message) -> Outcome: ...

    async def close(self) -> None: ...


def missing(service: str, app: str) -> Outcome:
    """The app has no credentials for this push service: an operator must act."""
    return Outcome(Result.RETRY, f"no {service} credentials for {app}", credentials=True)


def failure(exc: Exception) -> Outcome:
    """The outcome of a request that got no answer (an unusable URL: rejected)."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return Outcome(Result.REJECTED, str(exc)[:200])
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    return Outcome(Result.RETRY, f"{kind}: {type(exc).__name__}")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/bad."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return min(float(value[:12]), MAX_RETRY_AFTER)
    try:
        seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def by_status(status: int, headers: Mapping[str, str], reason: str) -> Outcome:
    """The usual reading of a push service's status (each sender refines it first)."""
    if 200 <= status < 300:
        return DELIVERED
    if status in (404, 410):
        return Outcome(Result.GONE, reason, status=status)
    if status in (401, 403):
        return Outcome(Result.RETRY, reason, retry_after(headers), credentials=True, status=status)
    if status == 429 or status >= 500:
        return Outcome(Result.RETRY, reason, retry_after(headers), status=status)
    return Outcome(Result.REJECTED, reason, status=status)
