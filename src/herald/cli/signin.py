"""`herald signin`: print a sign-in link to the web inbox for a user of an app (docs/inbox.md)."""

from __future__ import annotations

from urllib.parse import quote

import click

from herald.auth.sessions import SIGNIN_TTL, Sessions
from herald.cli.apps import find_app
from herald.cli.command import common_options, load_settings, run
from herald.cli.token import load_issuer


@click.command("signin")
@click.option("--app", "client_id", required=True, help="The app's client id.")
@click.option("--user", required=True, help="The user id (oid) who signs in.")
@click.option(
    "--ttl",
    type=click.IntRange(10, 86_400),
    default=SIGNIN_TTL,
    show_default=True,
    help="Seconds the link may be used in (once).",
)
@click.option("--port", type=int, help="The port Herald listens on, for the link (HERALD_PORT).")
@common_options
def signin(client_id: str, user: str, ttl: int, **options: str | None) -> None:
    """Print a single-use link that signs USER in to the web inbox of the app."""
    settings = load_settings(**options)
    if not settings.local_issuer:
        raise click.ClickException("the embedded issuer is disabled (local_issuer = false)")
    if not user.strip() or len(user) > 256 or not user.isprintable():
        raise click.BadParameter("must be a printable user id", param_hint="--user")
    run(find_app(settings, client_id))
    code = Sessions(load_issuer(settings)).signin_code(client_id, user, ttl)
    click.echo(f"{settings.base_url}/inbox/?app={quote(client_id, safe='')}#signin={code}")


def register(group: click.Group) -> None:
    group.add_command(signin)
