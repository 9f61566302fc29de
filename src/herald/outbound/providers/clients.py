"""The HTTP clients push requests go through: TLS with the operator's CA, answers read up to a
bound, and (for device-chosen endpoints) connections to public addresses only."""

from __future__ import annotations

import ssl
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

from herald.outbound.providers.http1 import MAX_ANSWER, Answer, Http1

__all__ = ["MAX_ANSWER", "Answer", "Http1", "client", "exchange", "sync_client", "tls_context"]


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The system's CAs plus `ca_file` (a private relay, a test), whatever SSL_CERT_FILE or
    REQUESTS_CA_BUNDLE say (clients are built with trust_env=False)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


def sync_client(ca_file: str, timeout: float) -> httpx.Client:
    """A blocking client (FCM's OAuth token requests, made by google-auth)."""
    return httpx.Client(
        verify=tls_context(ca_file), timeout=timeout, trust_env=False, cookies=_no_cookies()
    )


def client(ca_file: str, timeout: float, http2: bool = False) -> httpx.AsyncClient:
    """An HTTP client for one push service (no proxies or CAs from the environment; answers
    uncompressed, so `exchange` can bound them by their size on the wire)."""
    return httpx.AsyncClient(
        verify=tls_context(ca_file),
        trust_env=False,
        headers={"Accept-Encoding": "identity"},
        http2=http2,
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        follow_redirects=False,
        cookies=_no_cookies(),
    )


def _no_cookies() -> CookieJar:
    """A jar that keeps nothing (httpx keeps every cookie a service sets, and sends it back): a
    service's answer must leave no state that rides on later requests, as in http1.py."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


async def exchange(http: httpx.AsyncClient | Http1, method: str, url: str, **kw: Any) -> Answer:
    """One request, its answer read up to MAX_ANSWER bytes: a Web Push endpoint is the
    device's choice, and must not be able to make Herald read gigabytes. Failures raise
    httpx's exceptions whichever client sent it, so senders handle one kind."""
    if isinstance(http, Http1):
        return await http.request(method, url, **kw)
    async with http.stream(method, url, **kw) as streamed:
        body = bytearray()
        async for chunk in streamed.aiter_raw():
            body += chunk
            if len(body) >= MAX_ANSWER:
                break
        headers = [(k, v) for k, v in streamed.headers.multi_items() if k != "content-encoding"]
        return Answer(streamed.status_code, httpx.Headers(headers), bytes(body[:MAX_ANSWER]))
