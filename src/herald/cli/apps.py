"""`herald app create|list`: the app registry (client id + secret, host name = targetHostName)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import click

from herald.auth.credentials import hash_secret, new_client_id, new_client_secret
from herald.cli import common_options, load_settings, run
from herald.errors import HeraldError
from herald.model import App
from herald.settings import Settings
from herald.store import open_store

HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Client ids of external IdPs: GUIDs (Entra), names (Keycloak), Auth0's random strings, URIs.
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@click.group("app")
def app_group() -> None:
    """Register and list apps."""


@app_group.command("create")
@click.option("--host-name", required=True, help="The app's host name (its targetHostName).")
@click.option("--display-name", help="A name for people; defaults to the host name.")
@click.option(
    "--client-id",
    help="Use this client id (the app's id at an external identity provider, whose tokens name "
    "it in azp/appid); default: a new GUID.",
)
@common_options
def create(
    host_name: str, display_name: str | None, client_id: str | None, **options: str | None
) -> None:
    """Register an app; prints its clientId and clientSecret (shown once) as JSON."""
    if not HOST_NAME.match(host_name):
        raise click.BadParameter(
            f"{host_name!r} is not a valid host name", param_hint="--host-name"
        )
    if client_id is not None and not CLIENT_ID.fullmatch(client_id):
        raise click.BadParameter(
            "use 1-128 letters, digits and . _ - : /", param_hint="--client-id"
        )
    settings = load_settings(**options)
    secret = new_client_secret()
    app = App(
        client_id=client_id or new_client_id(),
        host_name=host_name.lower(),
        display_name=display_name or host_name,
        secret_hash=hash_secret(secret),
        created_date_time=datetime.now(UTC),
    )
    run(_add(settings, app))
    click.echo(
        json.dumps(
            {
                "clientId": app.client_id,
                "clientSecret": secret,
                "hostName": app.host_name,
                "displayName": app.display_name,
            }
        )
    )


async def _add(settings: Settings, app: App) -> None:
    settings.data.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.resolved_store_url, settings)
    await store.open()
    try:
        await store.add_app(app)
    except HeraldError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        await store.close()


@app_group.command("list")
@common_options
def list_apps(**options: str | None) -> None:
    """List registered apps as JSON (never their secrets)."""
    settings = load_settings(**options)
    apps = run(_list(settings))
    rows = [
        {
            "clientId": a.client_id,
            "hostName": a.host_name,
            "displayName": a.display_name,
            "createdDateTime": a.created_date_time.isoformat(),
        }
        for a in apps
    ]
    click.echo(json.dumps(rows, indent=2))


async def _list(settings: Settings) -> list[App]:
    store = open_store(settings.resolved_store_url, settings)
    await store.open()
    try:
        return await store.list_apps()
    finally:
        await store.close()


async def find_app(settings: Settings, client_id: str) -> App:
    store = open_store(settings.resolved_store_url, settings)
    await store.open()
    try:
        app = await store.get_app(client_id)
    finally:
        await store.close()
    if app is None:
        raise click.ClickException(f"no app with client id {client_id!r}; see `herald app list`")
    return app


def register(group: click.Group) -> None:
    group.add_command(app_group)
