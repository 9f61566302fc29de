"""`herald send`: post a notification to a user, like curl but shorter."""

from __future__ import annotations

import json
import os
from typing import Any

import click
import httpx

from herald.cli.apps import find_app
from herald.cli.command import common_options, load_settings, run
from herald.cli.token import mint


@click.command("send")
@click.option("--app", "client_id", required=True, help="The app's client id.")
@click.option("--user", required=True, help="The user to notify.")
@click.option("--title", help="Visual title.")
@click.option("--body", "text", help="Visual body.")
@click.option("--raw", help="Raw content for the app client.")
@click.option("--group", help="groupName.")
@click.option("--id", "app_id", help="appNotificationId (re-sending the same one replaces it).")
@click.option("--priority", type=click.Choice(["None", "High", "Low"], case_sensitive=False))
@click.option("--platform", "platforms", multiple=True, help="Target platform (repeatable).")
@click.option("--expires", help="expirationDateTime (ISO 8601).")
@click.option("--url", help="Herald's base URL (HERALD_URL; default from --host/--port).")
@common_options
def send(client_id: str, user: str, url: str | None, **fields: Any) -> None:
    """Post one notification and print the stored object."""
    options = {k: fields.pop(k) for k in ("config", "data", "store_url")}
    settings = load_settings(**options)
    host = run(find_app(settings, client_id)).host_name
    body = _body(host, **fields)
    token = mint(settings, client_id, user, 300)
    base = url or os.environ.get("HERALD_URL") or settings.base_url
    response = httpx.post(
        f"{base.rstrip('/')}/beta/me/notifications",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    click.echo(json.dumps(response.json(), indent=2))
    if response.status_code >= 400:
        raise SystemExit(1)


def _body(host: str, **f: Any) -> dict[str, Any]:
    if not f["title"] and f["raw"] is None:
        raise click.UsageError("give --title (visual) and/or --raw")
    payload: dict[str, Any] = {}
    if f["title"]:
        payload["visualContent"] = {"title": f["title"], "body": f["text"]}
    if f["raw"] is not None:
        payload["rawContent"] = f["raw"]
    body: dict[str, Any] = {"targetHostName": host, "payload": payload}
    optional = {
        "appNotificationId": f["app_id"],
        "groupName": f["group"],
        "priority": f["priority"],
        "expirationDateTime": f["expires"],
    }
    body.update({k: v for k, v in optional.items() if v})
    if f["platforms"]:
        body["targetPolicy"] = {"platformTypes": list(f["platforms"])}
    return body


def register(group: click.Group) -> None:
    group.add_command(send)
