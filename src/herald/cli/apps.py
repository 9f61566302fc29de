"""`herald app …`: the app registry. An app is its host name (= targetHostName); it has one or
more client ids (one per platform of a cross-device app), each with its own secret, all acting as
the same app (same feeds, subscriptions and push credentials)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from herald.auth.credentials import hash_secret, new_client_id, new_client_secret
from herald.cli.command import common_options, load_settings, run
from herald.errors import HeraldError
from herald.model import App
from herald.settings import Settings
from herald.store import Directory, open_store

T = TypeVar("T")

HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Client ids of external IdPs: GUIDs (Entra), names (Keycloak), Auth0's random strings, URIs.
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


# A client id's optional platform label, as Partner Center's cross-device apps had them.
PLATFORMS = {"windows": "windows", "ios": "iOS", "android": "android", "web": "web"}


def platform_option(command: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--platform",
        type=click.Choice(sorted(PLATFORMS.values()), case_sensitive=False),
        help="The platform this client id is for (a label).",
    )(command)


@click.group("app")
def app_group() -> None:
    """Register apps and manage their client ids."""


@app_group.command("create")
@click.option("--host-name", required=True, help="The app's host name (its targetHostName).")
@click.option("--display-name", help="A name for people; defaults to the host name.")
@click.option(
    "--client-id",
    help="Use this client id (the app's id at an external identity provider, whose tokens name "
    "it in azp/appid); default: a new GUID.",
)
@platform_option
@common_options
def create(
    host_name: str,
    display_name: str | None,
    client_id: str | None,
    platform: str | None,
    **options: str | None,
) -> None:
    """Register an app; prints its clientId and clientSecret (shown once) as JSON."""
    if not HOST_NAME.match(host_name):
        raise click.BadParameter(
            f"{host_name!r} is not a valid host name", param_hint="--host-name"
        )
    secret = new_client_secret()
    app = _client(host_name.lower(), client_id, platform, secret, display_name or host_name)
    run(in_store(load_settings(**options), lambda store: store.add_app(app)))
    click.echo(json.dumps(_shown(app, secret) | {"displayName": app.display_name}))


def _client(
    host_name: str, client_id: str | None, platform: str | None, secret: str, display: str = ""
) -> App:
    if client_id is not None and not CLIENT_ID.fullmatch(client_id):
        raise click.BadParameter(
            "use 1-128 letters, digits and . _ - : /", param_hint="--client-id"
        )
    return App(
        client_id=client_id or new_client_id(),
        host_name=host_name,
        display_name=display,
        secret_hash=hash_secret(secret),
        created_date_time=datetime.now(UTC),
        platform=PLATFORMS[platform.lower()] if platform else None,
    )


def _shown(app: App, secret: str | None = None) -> dict[str, Any]:
    shown: dict[str, Any] = {"clientId": app.client_id}
    if secret is not None:
        shown["clientSecret"] = secret
    return shown | {"hostName": app.host_name, "platform": app.platform}


async def in_store(settings: Settings, job: Callable[[Directory], Awaitable[T]]) -> T:
    """Run `job` on the configured store's apps and users; a Herald error becomes the
    command's error."""
    settings.data.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.resolved_store_url, settings)
    await store.open()
    try:
        return await job(store)
    except HeraldError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        await store.close()


@app_group.command("list")
@common_options
def list_apps(**options: str | None) -> None:
    """List registered apps as JSON, one row per client id (never their secrets)."""
    apps = run(in_store(load_settings(**options), lambda store: store.list_apps()))
    click.echo(json.dumps([_row(a) for a in apps], indent=2))


def _row(a: App) -> dict[str, Any]:
    return _shown(a) | {
        "displayName": a.display_name,
        "createdDateTime": a.created_date_time.isoformat(),
    }


@app_group.command("delete")
@click.argument("app")
@click.option("--yes", is_flag=True, help="Really delete: without it, nothing is removed.")
@common_options
def delete(app: str, yes: bool, **options: str | None) -> None:
    """Remove APP (host name or any of its client ids) and all its data: notifications, their
    changes, subscriptions, queued pushes, push credentials and client ids. Prints the counts."""
    settings = load_settings(**options)
    found = run(_find(settings, app))
    if not yes:
        raise click.ClickException(
            f"this removes the app {found.host_name!r} and all its data (notifications, "
            "subscriptions, push credentials, client ids) for good; add --yes to do it"
        )
    counts = run(in_store(settings, lambda store: store.delete_app(found.host_name)))
    click.echo(json.dumps({"hostName": found.host_name, "deleted": counts}))


@app_group.group("client")
def client_group() -> None:
    """An app's client ids: one per platform of a cross-device app, each with its own secret."""


@client_group.command("add")
@click.argument("app")
@click.option("--client-id", help="Use this client id (e.g. the app's id at an external IdP).")
@platform_option
@common_options
def add_client(
    app: str, client_id: str | None, platform: str | None, **options: str | None
) -> None:
    """Give APP (host name or client id) another client id; prints it and its secret (shown
    once) as JSON."""
    settings = load_settings(**options)
    found = run(_find(settings, app))
    secret = new_client_secret()
    added = _client(found.host_name, client_id, platform, secret)
    run(in_store(settings, lambda store: store.add_client(added)))
    click.echo(json.dumps(_shown(added, secret)))


@client_group.command("list")
@click.argument("app")
@common_options
def list_clients(app: str, **options: str | None) -> None:
    """List the client ids of APP (host name or client id) as JSON."""
    settings = load_settings(**options)
    found = run(_find(settings, app))
    apps = run(in_store(settings, lambda store: store.list_apps()))
    click.echo(json.dumps([_row(a) for a in apps if a.host_name == found.host_name], indent=2))


@client_group.command("remove")
@click.argument("client_id")
@common_options
def remove_client(client_id: str, **options: str | None) -> None:
    """Remove a client id (not an app's last one: `herald app delete` removes the app)."""
    run(in_store(load_settings(**options), lambda store: store.remove_client(client_id)))
    click.echo(json.dumps({"removed": client_id}))


@client_group.command("rotate-secret")
@click.argument("client_id")
@common_options
def rotate_secret(client_id: str, **options: str | None) -> None:
    """Give a client id a new secret (printed once, as JSON); the old one stops working at the
    token endpoint at once (tokens already issued stay valid until they expire)."""
    secret = new_client_secret()
    hashed = hash_secret(secret)
    settings = load_settings(**options)
    run(in_store(settings, lambda store: store.set_client_secret(client_id, hashed)))
    click.echo(json.dumps({"clientId": client_id, "clientSecret": secret}))


async def _find(settings: Settings, name: str) -> App:
    """The app named by one of its client ids or by its host name."""

    async def job(store: Directory) -> App | None:
        app = await store.get_app(name)
        if app is None:
            app = next((a for a in await store.list_apps() if a.host_name == name.lower()), None)
        return app

    found = await in_store(settings, job)
    if found is None:
        raise click.ClickException(
            f"no app {name!r} (client id or host name); see `herald app list`"
        )
    return found


async def find_app(settings: Settings, client_id: str) -> App:
    app = await in_store(settings, lambda store: store.get_app(client_id))
    if app is None:
        raise click.ClickException(f"no app with client id {client_id!r}; see `herald app list`")
    return app


def register(group: click.Group) -> None:
    group.add_command(app_group)
