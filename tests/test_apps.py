"""Cross-device apps: one app (one targetHostName) with a client id per platform, against a
running Herald (SQLite and PostgreSQL), and the CLI that manages client ids, secrets and apps."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from click.testing import CliRunner

from herald.cli import main
from tests.conftest import RegisteredApp, Server
from tests.devices import (
    api,
    assert_graph_error,
    notification_body,
    open_stream,
    subscription_body,
    webpush_channel,
)

FEED = "/beta/me/notifications"
SUBS = "/beta/me/notificationSubscriptions"


def cli(server: Server, *args: str, ok: bool = True) -> Any:
    result = CliRunner().invoke(main, [*args, *server.cli_args])
    assert (result.exit_code == 0) == ok, result.output
    return json.loads(result.stdout) if ok else result.output


def add_client(server: Server, app: RegisteredApp, platform: str) -> RegisteredApp:
    info = cli(server, "app", "client", "add", app.host_name, "--platform", platform)
    assert info["hostName"] == app.host_name and info["platform"] == platform
    return RegisteredApp(info["clientId"], info["clientSecret"], app.host_name)


def app_only_token(server: Server, app: RegisteredApp) -> str:
    with httpx.Client(base_url=server.base_url) as http:
        grant = http.post(
            "/oauth2/v2.0/token",
            data={"grant_type": "client_credentials"},
            auth=(app.client_id, app.client_secret),
        )
    assert grant.status_code == 200, grant.text
    return str(grant.json()["access_token"])


async def test_client_ids_of_one_app_share_feed_state_and_devices(
    server: Server, app: RegisteredApp
) -> None:
    windows = app
    # The CLI runs its own event loop: in a thread, off this test's.
    ios = await asyncio.to_thread(add_client, server, app, "iOS")
    third = await asyncio.to_thread(server.register)
    user = f"xd-{uuid.uuid4()}"
    win_token, ios_token = server.token(windows, user), server.token(ios, user)
    async with api(server.base_url, win_token) as w, api(server.base_url, ios_token) as i:
        win_sub = (await w.post(SUBS, json=subscription_body(app.host_name))).json()["id"]
        ios_sub = (await i.post(SUBS, json=subscription_body(app.host_name))).json()["id"]
        async with (
            open_stream("ws", server.base_url, win_sub, win_token) as win_stream,
            open_stream("sse", server.base_url, ios_sub, ios_token) as ios_stream,
        ):
            for stream in (win_stream, ios_stream):
                assert (await stream.next())["type"] == "ready"
            # a post made with either client id reaches the devices of both
            for poster in (windows, ios):
                token = app_only_token(server, poster)
                async with api(server.base_url, token) as server_side:
                    r = await server_side.post(
                        f"/beta/users/{user}/notifications",
                        json=notification_body(app.host_name),
                    )
                    assert r.status_code == 201, r.text
                for stream in (win_stream, ios_stream):
                    message = await stream.next()
                    assert message["type"] == "created" and message["id"] == r.json()["id"]
            first = r.json()["id"]
            # each sees the other's read state, on its stream and in its feed
            patched = await w.patch(f"{FEED}/{first}", json={"readState": "read"})
            assert patched.status_code == 200, patched.text
            seen = await ios_stream.next()
            assert seen["type"] == "updated" and seen["notification"]["readState"] == "read"
            assert (await i.get(f"{FEED}/{first}")).json()["readState"] == "read"
        # the same subscriptions and push credentials
        listed = {s["id"] for s in (await i.get(SUBS)).json()["value"]}
        assert listed == {win_sub, ios_sub}
        keys = [(await c.get("/beta/webPushKey")).json() for c in (w, i)]
        assert keys[0] == keys[1] and keys[0]["application"] == app.host_name
        assert (await i.get(f"{FEED}/$count")).text == "2"
    # a third app sees nothing of it
    async with api(server.base_url, server.token(third, user)) as other:
        assert (await other.get(FEED)).json()["value"] == []
        assert_graph_error(await other.get(f"{FEED}/{first}"), 404, "itemNotFound")
        assert (await other.get(SUBS)).json()["value"] == []
        r = await other.post(FEED, json=notification_body(app.host_name))
        assert_graph_error(r, 403, "accessDenied")


def test_client_ids_are_listed_rotated_and_removed(server: Server, app: RegisteredApp) -> None:
    android = add_client(server, app, "android")
    listed = cli(server, "app", "client", "list", android.client_id)
    assert [(c["clientId"], c["platform"]) for c in listed] == [
        (app.client_id, None),
        (android.client_id, "android"),
    ]
    assert all("clientSecret" not in c for c in listed)
    app_only_token(server, android)
    rotated = cli(server, "app", "client", "rotate-secret", android.client_id)
    assert rotated["clientSecret"] != android.client_secret
    with httpx.Client(base_url=server.base_url) as http:
        old = http.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(android.client_id, android.client_secret),
        )
    assert old.status_code == 401
    android = RegisteredApp(android.client_id, rotated["clientSecret"], app.host_name)
    app_only_token(server, android)
    assert cli(server, "app", "client", "remove", android.client_id)["removed"]
    with httpx.Client(base_url=server.base_url) as http:
        gone = http.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(android.client_id, android.client_secret),
        )
    assert gone.status_code == 401
    assert "last client id" in cli(server, "app", "client", "remove", app.client_id, ok=False)
    taken = cli(
        server, "app", "client", "add", app.host_name, "--client-id", app.client_id, ok=False
    )
    assert "taken" in taken


def test_every_client_id_signs_in_and_mints_tokens(server: Server, app: RegisteredApp) -> None:
    web = add_client(server, app, "web")
    user = f"xd-{uuid.uuid4()}"
    token = CliRunner().invoke(
        main, ["token", "--app", web.client_id, "--user", user, *server.cli_args]
    )
    assert token.exit_code == 0, token.output
    c = server.client(token.stdout.strip())
    assert c.post(FEED, json=notification_body(app.host_name)).status_code == 201
    link = CliRunner().invoke(
        main, ["signin", "--app", web.client_id, "--user", user, *server.cli_args]
    )
    assert link.exit_code == 0, link.output
    code = link.stdout.strip().split("#signin=", 1)[1]
    with httpx.Client(base_url=server.base_url) as http:
        grant = http.post(
            "/oauth2/v2.0/token",
            data={
                "grant_type": "urn:herald:params:oauth:grant-type:signin-code",
                "client_id": web.client_id,
                "code": code,
            },
        )
    assert grant.status_code == 200, grant.text
    session = server.client(grant.json()["access_token"])
    # the web client's session reads the feed the other client id posted to
    assert len(session.get(FEED).json()["value"]) == 1


def test_app_delete_removes_the_app_and_its_data(server: Server, app: RegisteredApp) -> None:
    ios = add_client(server, app, "iOS")
    other = server.register()
    user = f"xd-{uuid.uuid4()}"
    c = server.client(server.token(app, user))
    n = c.post(FEED, json=notification_body(app.host_name)).json()
    assert (
        c.post(
            SUBS, json=subscription_body(app.host_name, "webPush", pushChannel=webpush_channel())
        ).status_code
        == 201
    )
    kept = server.client(server.token(other, user))
    kept_n = kept.post(FEED, json=notification_body(other.host_name)).json()

    refused = cli(server, "app", "delete", ios.client_id, ok=False)
    assert "--yes" in refused
    assert c.get(f"{FEED}/{n['id']}").status_code == 200  # nothing removed without it
    done = cli(server, "app", "delete", app.host_name, "--yes")
    assert done["hostName"] == app.host_name
    counts = done["deleted"]
    assert counts["notifications"] == 1 and counts["subscriptions"] == 1
    assert counts["clientIds"] == 2 and counts["changes"] == 1
    assert all(a["hostName"] != app.host_name for a in cli(server, "app", "list"))
    assert "no app" in cli(server, "app", "delete", app.host_name, "--yes", ok=False)
    # registered again, the host name starts empty
    again = server.register(app.host_name)
    fresh = server.client(server.token(again, user))
    assert fresh.get(FEED).json()["value"] == []
    assert fresh.get(SUBS).json()["value"] == []
    assert kept.get(f"{FEED}/{kept_n['id']}").status_code == 200
