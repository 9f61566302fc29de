"""`herald token`: mint a delegated user token from the embedded issuer (for development)."""

from __future__ import annotations

import click

from herald.auth.issuer import LocalIssuer
from herald.cli.apps import find_app
from herald.cli.command import common_options, load_settings, run
from herald.service import share_issuer_key
from herald.settings import Settings
from herald.store import open_store


def mint(settings: Settings, client_id: str, user: str | None, ttl: int) -> str:
    if not settings.local_issuer:
        raise click.ClickException("the embedded issuer is disabled (local_issuer = false)")
    run(find_app(settings, client_id))
    return load_issuer(settings).mint(client_id=client_id, user_id=user, ttl_seconds=ttl)


def load_issuer(settings: Settings) -> LocalIssuer:
    """The embedded issuer with the key `herald serve` signs with: the data directory's, or on a
    store several machines share (PostgreSQL) the one stored there."""
    settings.data.mkdir(parents=True, exist_ok=True)
    issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    if not settings.resolved_store_url.startswith("sqlite:"):
        run(_share(settings, issuer))
    return issuer


async def _share(settings: Settings, issuer: LocalIssuer) -> None:
    store = open_store(settings.resolved_store_url, settings)
    await store.open()
    try:
        await share_issuer_key(issuer, store)
    finally:
        await store.close()


@click.command("token")
@click.option("--app", "client_id", required=True, help="The app's client id.")
@click.option("--user", help="The user id (oid); omit for an app-only token.")
@click.option("--ttl", type=int, default=3600, show_default=True, help="Lifetime in seconds.")
@common_options
def token(client_id: str, user: str | None, ttl: int, **options: str | None) -> None:
    """Print a bearer token for USER of the app (or an app-only token without --user)."""
    click.echo(mint(load_settings(**options), client_id, user, ttl))


def register(group: click.Group) -> None:
    group.add_command(token)
