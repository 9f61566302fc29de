"""The push surface of the API (docs/push.md): the VAPID key endpoint and what a subscription's
push channel must be before Herald will push to it, against a running Herald with the default
endpoint policy (private addresses refused)."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from herald.cli import main
from tests.conftest import RegisteredApp, Server, servers
from tests.devices import assert_graph_error, b64url, p256dh, subscription_body

SUBS = "/beta/me/notificationSubscriptions"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Herald as shipped: Web Push endpoints on private networks are refused."""
    yield from servers(
        "sqlite", tmp_path_factory.mktemp("herald"), push_allow_private_endpoints=False
    )


@pytest.fixture(scope="module")
def app(strict: Server) -> RegisteredApp:
    return strict.register()


def _webpush(endpoint: str, key: str | None = None) -> dict[str, object]:
    return {
        "endpoint": endpoint,
        "keys": {"p256dh": key or p256dh(), "auth": b64url(os.urandom(16))},
    }


def test_the_vapid_key_is_the_apps_own_and_stable(strict: Server, app: RegisteredApp) -> None:
    first = strict.client(strict.token(app, "alice")).get("/beta/webPushKey")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["application"] == app.host_name
    point = base64.urlsafe_b64decode(body["applicationServerKey"] + "==")
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)  # a P-256 point
    # An app-only token of the same app gets the same key; the CLI prints it too.
    again = strict.client(strict.token(app, None)).get("/v1.0/webPushKey").json()
    assert again["applicationServerKey"] == body["applicationServerKey"]
    cli = CliRunner().invoke(main, ["app", "push-key", app.host_name, *strict.cli_args])
    assert cli.exit_code == 0, cli.output
    assert cli.stdout.strip() == body["applicationServerKey"]
    # Another app has another key.
    other = strict.register()
    theirs = strict.client(strict.token(other, "alice")).get("/beta/webPushKey").json()
    assert theirs["applicationServerKey"] != body["applicationServerKey"]


def test_the_vapid_key_needs_a_token(strict: Server) -> None:
    assert_graph_error(strict.client().get("/beta/webPushKey"), 401, "InvalidAuthenticationToken")


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://127.0.0.1/push/1",
        "https://127.0.0.1:8443/push/1",
        "https://10.1.2.3/push",
        "https://192.168.0.10/push",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/push",
        "https://[fd00::1]/push",
        "https://[::ffff:127.0.0.1]/push",
        "https://[64:ff9b::a00:1]/push",  # NAT64 of 10.0.0.1
        "https://[2002:a00:1::]/push",  # 6to4 of 10.0.0.1
        "https://[fec0::1]/push",
        "https://user:secret@push.example.net/push",  # user info is never sent
    ],
)
def test_a_web_push_endpoint_on_a_private_address_is_refused(
    strict: Server, app: RegisteredApp, endpoint: str
) -> None:
    c = strict.client(strict.token(app, "alice"))
    body = subscription_body(app.host_name, "webPush", pushChannel=_webpush(endpoint))
    assert_graph_error(c.post(SUBS, json=body), 400, "invalidRequest", "pushChannel.endpoint")
    assert c.get(SUBS).json()["value"] == []


def test_a_name_resolving_to_a_private_address_is_never_sent_to(
    strict: Server, app: RegisteredApp
) -> None:
    """A host name is accepted at registration (it may resolve anywhere later), but Herald
    checks the addresses before it connects: `localhost` is refused at send time."""
    c = strict.client(strict.token(app, "erin"))
    channel = _webpush("https://localhost:9/push/x")
    r = c.post(SUBS, json=subscription_body(app.host_name, "webPush", pushChannel=channel))
    assert r.status_code == 201, r.text
    sub_id = r.json()["id"]
    app_token = strict.token(app, None)
    post = strict.client(app_token).post(
        "/beta/users/erin/notifications",
        json={"targetHostName": app.host_name, "payload": {"visualContent": {"title": "x"}}},
    )
    assert post.status_code == 201, post.text
    deadline = time.monotonic() + 15
    state = c.get(f"{SUBS}/{sub_id}").json()["deliveryState"]
    while state["lastError"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
        state = c.get(f"{SUBS}/{sub_id}").json()["deliveryState"]
    assert state["lastError"] == "the endpoint resolves to a private address", state
    assert state["consecutiveFailures"] == 1 and state["lastDeliveredDateTime"] is None


async def test_the_connection_resolver_refuses_private_addresses() -> None:
    """The second line of defence (DNS rebinding): the Web Push connections check the addresses
    a name resolves to, and connect to none if one is private."""
    from herald.outbound.providers.clients import Http1, tls_context

    accepted: list[asyncio.StreamWriter] = []
    listener = await asyncio.start_server(lambda _, w: accepted.append(w), "127.0.0.1", 0)
    url = f"http://localhost:{listener.sockets[0].getsockname()[1]}/push/x"
    strict, open_ = Http1(tls_context(""), 5.0, public_only=True), Http1(tls_context(""), 0.5)
    try:
        with pytest.raises(httpx.ConnectError) as refused:
            await strict.request("POST", url, content=b"x")
        assert "private address" in str(refused.value.__cause__)
        assert accepted == []
        with pytest.raises(httpx.ReadTimeout):  # without the check it connects (no answer)
            await open_.request("POST", url, content=b"x")
        assert len(accepted) == 1
    finally:
        await strict.aclose()
        await open_.aclose()
        listener.close()
        for w in accepted:
            w.close()


def test_a_p256dh_key_off_the_curve_is_refused(strict: Server, app: RegisteredApp) -> None:
    c = strict.client(strict.token(app, "bob"))
    off_curve = b64url(b"\x04" + b"\x01" * 64)
    channel = _webpush("https://push.example.net/x", off_curve)
    body = subscription_body(app.host_name, "webPush", pushChannel=channel)
    assert_graph_error(c.post(SUBS, json=body), 400, "invalidRequest", "pushChannel.keys.p256dh")
    assert c.get(SUBS).json()["value"] == []


def test_a_wns_channel_must_name_a_wns_host(strict: Server, app: RegisteredApp) -> None:
    c = strict.client(strict.token(app, "carol"))
    for uri in (
        "https://evil.example.com/?token=x",
        "https://notify.windows.com.evil.example/?token=x",
        "http://db5.notify.windows.com/?token=x",
    ):
        body = subscription_body(app.host_name, "windows", pushChannel={"channelUri": uri})
        assert_graph_error(c.post(SUBS, json=body), 400, "invalidRequest", "pushChannel.channelUri")
    ok = {"channelUri": "https://db5.notify.windows.com/?token=AwYAAAB"}
    r = c.post(SUBS, json=subscription_body(app.host_name, "windows", pushChannel=ok))
    assert r.status_code == 201, r.text


def test_delivery_state_is_shown_and_read_only(strict: Server, app: RegisteredApp) -> None:
    c = strict.client(strict.token(app, "dave"))
    r = c.post(SUBS, json=subscription_body(app.host_name, "iOS"))
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["deliveryState"] == {
        "lastDeliveredDateTime": None,
        "consecutiveFailures": 0,
        "lastError": None,
        "goneDateTime": None,
    }
    patch = c.patch(f"{SUBS}/{sub['id']}", json={"deliveryState": {"consecutiveFailures": 9}})
    assert_graph_error(patch, 400, "invalidRequest", "deliveryState")
    assert c.get(f"{SUBS}/{sub['id']}").json()["deliveryState"] == sub["deliveryState"]


def test_push_set_refuses_unusable_credentials(
    strict: Server, app: RegisteredApp, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = tmp_path / "AuthKey_RSA.p8"
    bad.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    args = ["--key-id", "ABC123DEFG", "--team-id", "TEAM123456", "--topic", "com.example"]
    cli = CliRunner().invoke(
        main,
        ["app", "push-set", "apns", app.host_name, "--key-file", str(bad), *args, *strict.cli_args],
    )
    assert cli.exit_code == 2 and "P-256" in cli.output, cli.output
    array = tmp_path / "sa.json"
    array.write_text("[1, 2]")
    cli = CliRunner().invoke(
        main,
        [
            "app",
            "push-set",
            "fcm",
            app.host_name,
            "--service-account",
            str(array),
            *strict.cli_args,
        ],
    )
    assert cli.exit_code == 2 and "service account" in cli.output, cli.output
    shown = CliRunner().invoke(main, ["app", "push-show", app.host_name, *strict.cli_args])
    assert shown.exit_code == 0, shown.output
    assert "apns" not in shown.stdout and "fcm" not in shown.stdout
