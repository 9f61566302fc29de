"""Where pushes may go. A Web Push endpoint is any URL a device registers, so without a check
Herald would POST wherever a user points it (SSRF): loopback, private networks, cloud metadata.
Endpoints whose host is, or resolves to, such an address are refused unless the operator allows
private endpoints (`push_allow_private_endpoints`, e.g. for a push relay on the LAN or a test).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import urlsplit

RESOLVED_TTL = 60.0  # seconds a host's verdict is cached
MAX_CACHED = 10_000


# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, IPv4-compatible,
# IPv4-mapped, SIIT): the embedded address is what gets reached.
EMBEDDING = tuple(
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0/96")
)
SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def public_address(address: str) -> bool:
    """Whether an IP address is on the public internet (IPv6 forms of an IPv4 address judged
    by the IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in SITE_LOCAL:
            return False
        if ip in SIX_TO_FOUR:
            return public_address(str(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)))
        if ip in SIIT or any(ip in net for net in EMBEDDING):
            return public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    return ip.is_global and not ip.is_multicast


def literal_host(url: str) -> str | None:
    """The host of `url` if it is an IP literal, else None."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return host


class Guard:
    """Checks endpoints before Herald connects to them (resolving names, with a short cache).

    A check at send time narrows but does not close a DNS-rebinding window (the HTTP client
    resolves again); that is why the cache is short and private addresses are refused outright.
    """

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.verdicts: dict[str, tuple[float, bool]] = {}

    async def allowed(self, url: str) -> bool:
        if self.allow_private:
            return True
        parts = urlsplit(url)
        host = parts.hostname or ""
        if literal_host(url) is not None:
            return public_address(host)
        cached = self.verdicts.get(host)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parts.port or 443, type=socket.SOCK_STREAM
            )
            verdict = bool(infos) and all(public_address(str(i[4][0])) for i in infos)
        except (OSError, UnicodeError, ValueError):
            return True  # unresolvable: the request fails on its own (and is retried)
        if len(self.verdicts) >= MAX_CACHED:
            self.verdicts.clear()
        self.verdicts[host] = (time.monotonic() + RESOLVED_TTL, verdict)
        return verdict
