"""Local stand-ins for the push services (Web Push, APNs, FCM, WNS) that verify the protocol.

Each serves HTTPS (a throwaway CA: `make_tls`) on hypercorn with ALPN h2 and http/1.1, checks
every request the way the real service does, answers with the real service's status and error
body, and records what it accepted (verified and decoded) and what it refused. See
`base.StandIn` for the shared API (accepted/refused/wait_accepted/fault/delay/gone/reset) and the
control API; `python -m tests.standins` runs one in its own process.
"""

from tests.standins.apns import ApnsStandIn
from tests.standins.base import Delivery, Refusal, StandIn
from tests.standins.control import ControlClient
from tests.standins.fcm import FcmStandIn
from tests.standins.process import Spawned, spawn
from tests.standins.tls import TlsFiles, make_tls
from tests.standins.webpush import WebPushStandIn
from tests.standins.wns import WnsStandIn

PROVIDERS: dict[str, type[StandIn]] = {
    "webpush": WebPushStandIn,
    "apns": ApnsStandIn,
    "fcm": FcmStandIn,
    "wns": WnsStandIn,
}

__all__ = [
    "PROVIDERS",
    "ApnsStandIn",
    "ControlClient",
    "Delivery",
    "FcmStandIn",
    "Refusal",
    "Spawned",
    "StandIn",
    "TlsFiles",
    "WebPushStandIn",
    "WnsStandIn",
    "make_tls",
    "spawn",
]
