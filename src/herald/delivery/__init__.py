"""Push channels: one module per push service, each a `Channel` (see `base.py`)."""

from herald.delivery.apns import Apns
from herald.delivery.base import Channel, Http1, Keyring, Outcome, Result, client
from herald.delivery.fcm import Fcm
from herald.delivery.guard import Guard
from herald.delivery.webpush import WebPush
from herald.delivery.wns import Wns
from herald.model import Provider
from herald.settings import Settings


def channels(settings: Settings, keyring: Keyring) -> dict[Provider, Channel]:
    """One channel per provider, each with its own HTTP client (APNs speaks only HTTP/2:
    httpx; the others HTTP/1.1 on aiohttp, see `Http1`)."""
    ca, timeout = settings.push_ca_file, settings.push_timeout
    return {
        Provider.WEBPUSH: WebPush(
            keyring,
            Http1(ca, timeout, public_only=not settings.push_allow_private_endpoints),
            settings.vapid_subject,
            Guard(settings.push_allow_private_endpoints),
        ),
        Provider.APNS: Apns(
            keyring,
            client(ca, timeout, http2=True),
            settings.push_apns_production_url,
            settings.push_apns_development_url,
        ),
        Provider.FCM: Fcm(keyring, Http1(ca, timeout), settings.push_fcm_url, ca),
        Provider.WNS: Wns(
            keyring, Http1(ca, timeout), settings.push_wns_token_url, settings.push_wns_hosts
        ),
    }


__all__ = ["Channel", "Keyring", "Outcome", "Result", "channels"]
