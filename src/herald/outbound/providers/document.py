"""The message as every provider carries it: one JSON document (docs/push.md, "What a device is
sent"), shortened to fit a provider's size limit, and the small renderings providers share."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec

from herald.model import Message, PushKind


def document(message: Message, truncated: bool = False, visual: bool = False) -> dict[str, Any]:
    """The JSON object every provider carries (docs/push.md). `truncated`: content dropped (with
    `visual`: only rawContent; the title and body stay)."""
    out: dict[str, Any] = {
        "type": message.kind.value,
        "position": message.position,
        "id": message.notification_id,
    }
    if message.kind is not PushKind.REMOVE:
        out["appNotificationId"] = message.app_notification_id
        if message.group_name is not None:
            out["groupName"] = message.group_name
        payload = message.payload
        if payload is not None:
            if payload.visual_content is not None and (visual or not truncated):
                out["title"] = payload.visual_content.title
                if payload.visual_content.body is not None:
                    out["body"] = payload.visual_content.body
            if payload.raw_content is not None and not truncated:
                out["rawContent"] = payload.raw_content
        out["priority"] = message.priority.value
        out["readState"] = message.read_state.value
        out["userActionState"] = message.user_action_state.value
        if message.display_time_to_live is not None:
            out["displayTimeToLive"] = message.display_time_to_live
        out["expirationDateTime"] = iso(message.expires)
    if truncated:
        out["truncated"] = True
    return out


def shortened(message: Message) -> Iterator[dict[str, Any]]:
    """The message from whole to shoulder tap, for a sender to send the first that fits: whole;
    without rawContent, if it also has a title and body to keep; without any content."""
    yield document(message)
    payload = message.payload
    if payload is not None and payload.raw_content is not None and payload.visual_content:
        yield document(message, truncated=True, visual=True)
    yield document(message, truncated=True)


def fitted(message: Message, limit: int, overhead: int = 0) -> bytes:
    """The message as JSON, shortened (docs/push.md) if it is longer than `limit - overhead`."""
    for doc in shortened(message):
        body = msgspec.json.encode(doc)
        if len(body) + overhead <= limit:
            break
    return body


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_left(expires: datetime, cap: int) -> int:
    return max(0, min(cap, int(expires.timestamp() - time.time())))


def collapse_key(notification_id: str, size: int) -> str:
    """A collapse key/tag of at most `size` base64url characters for a notification: its id
    (a replace keeps the id) if it fits, else a digest of it."""
    if len(notification_id) <= size and all(c.isalnum() or c in "-_" for c in notification_id):
        return notification_id
    digest = base64.urlsafe_b64encode(hashlib.sha256(notification_id.encode()).digest())
    return digest.decode().rstrip("=")[:size]
