"""Identity and authorization: client credentials, the embedded issuer, token verification.

See docs/auth.md.
"""

from herald.auth.credentials import hash_secret, new_client_id, new_client_secret, verify_secret
from herald.auth.issuer import SCOPE, LocalIssuer
from herald.auth.tokens import (
    ALLOWED_ALGORITHMS,
    IssuerConfig,
    Principal,
    TokenVerifier,
    require_permission,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "SCOPE",
    "IssuerConfig",
    "LocalIssuer",
    "Principal",
    "TokenVerifier",
    "hash_secret",
    "new_client_id",
    "new_client_secret",
    "require_permission",
    "verify_secret",
]
