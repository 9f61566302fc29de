"""User ids and user principal names, as Graph addresses users.

* A user id that is a GUID is case-insensitive (Graph's object ids are GUIDs): Herald keeps it in
  lower case, wherever it comes from (a token's `oid`/`sub`, a path, the CLI), so `ALICE-GUID` and
  `alice-guid` are one feed. Any other id is kept exactly as given (an IdP's `sub` may be case
  sensitive).
* `/users/{userPrincipalName}` names a user by UPN (`alice@contoso.com`, case-insensitive). Herald
  has no directory: it learns which user id a UPN names from delegated tokens (their `upn` or
  `preferred_username` claim, unless `learn_user_names` is off) or from `herald user set`, which
  pins the name. A UPN it does not know is taken as a plain user id, as before.
"""

from __future__ import annotations

import re

_GUID = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")
MAX_UPN = 256


def canonical(user_id: str) -> str:
    """The stored form of a user id: lower case if it is a GUID, else unchanged."""
    return user_id.lower() if len(user_id) == 36 and _GUID.fullmatch(user_id) else user_id


def is_principal_name(value: str) -> bool:
    """Whether a path segment names a user by UPN (`name@domain`) rather than by id."""
    name, at, domain = value.rpartition("@")
    return bool(at and name and domain) and len(value) <= MAX_UPN and value.isprintable()


def principal_name(value: str) -> str:
    """The key a UPN is kept under: lower case."""
    return value.lower()
