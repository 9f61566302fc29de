"""Push providers: one module per push service, each registering one `Entry` (see `table.py`)
in the table below. The other modules are what they share: the Sender protocol and outcomes
(`sender.py`), HTTP clients (`clients.py`), the message document (`document.py`), the
credentials keyring (`keyring.py`) and the endpoint guard (`guard.py`)."""

from herald.outbound.providers import apns, fcm, webpush, wns
from herald.outbound.providers.table import Table

PROVIDERS = Table(
    webpush.ENTRY,
    apns.ENTRY,
    fcm.ENTRY,
    wns.ENTRY,
)

__all__ = ["PROVIDERS"]
