"""Checks of one input field: each returns the value or raises a Graph-shaped InvalidRequest that
names the field. Shared by the API's request bodies and the providers' push channel parsers."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urlsplit

from herald.errors import InvalidRequest

MAX_URL = 2048


def string(value: Any, field: str, max_length: int, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise InvalidRequest(f"'{field}' is required.", target=field)
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{field}' must be a string.", target=field)
    if required and not value.strip():
        raise InvalidRequest(f"'{field}' must not be empty.", target=field)
    if len(value) > max_length:
        raise InvalidRequest(f"'{field}' is longer than {max_length} characters.", target=field)
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; refuse it everywhere alike
        raise InvalidRequest(f"'{field}' must not contain NUL characters.", target=field)
    return value


def required(value: Any, field: str, max_length: int) -> str:
    """A string that must be given and not be blank."""
    text = string(value, field, max_length, required=True)
    assert text is not None
    return text


def https_url(value: Any, field: str) -> str:
    url = required(value, field, MAX_URL)
    try:
        parts = urlsplit(url)
        valid = (
            parts.scheme == "https"
            and bool(parts.hostname)
            and parts.port != 0
            and parts.username is None  # user info: never sent (and it would be a secret)
        )
    except ValueError:  # e.g. "https://[::1/x" or a port out of range
        valid = False
    if not valid or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidRequest(f"'{field}' must be an https URL.", target=field)
    return url


def base64url(value: Any, field: str, size: int) -> str:
    """`size` bytes given in base64url (padding optional), as given."""
    text = required(value, field, 256)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size or not text.isascii():
        raise InvalidRequest(f"'{field}' must be {size} bytes in base64url.", target=field)
    return text


def members(value: Any, field: str, keys: set[str]) -> dict[str, Any]:
    """An object with no properties but `keys`."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{field}' must be an object.", target=field)
    unknown = sorted(set(value) - keys)
    if unknown:
        target = f"{field}.{unknown[0]}"
        raise InvalidRequest(f"Unknown property '{target}' in the request body.", target=target)
    return value
