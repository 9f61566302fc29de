"""`herald user set|list|remove`: which user a principal name (`/users/alice@contoso.com`)
names. Herald also learns names from delegated tokens (herald/users.py); one set here is pinned:
tokens no longer change it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from herald.cli.apps import in_store
from herald.cli.command import common_options, load_settings, run
from herald.users import MAX_UPN, canonical, is_principal_name, principal_name


@click.group("user")
def user_group() -> None:
    """Name users by their user principal name (UPN)."""


@user_group.command("set")
@click.option("--upn", required=True, help="The user principal name, e.g. alice@contoso.com.")
@click.option("--user", "user_id", required=True, help="The user id (oid) it names.")
@common_options
def set_name(upn: str, user_id: str, **options: str | None) -> None:
    """Make UPN name USER (pinned: tokens that say otherwise do not change it)."""
    if not is_principal_name(upn):
        raise click.BadParameter(
            f"a name@domain of at most {MAX_UPN} characters", param_hint="--upn"
        )
    if not user_id.strip() or len(user_id) > 256 or not user_id.isprintable():
        raise click.BadParameter("must be a printable user id", param_hint="--user")
    name, user = principal_name(upn), canonical(user_id)
    now = datetime.now(UTC)
    run(in_store(load_settings(**options), lambda s: s.name_user(name, user, True, now)))
    click.echo(json.dumps({"upn": name, "userId": user, "pinned": True}))


@user_group.command("list")
@common_options
def list_names(**options: str | None) -> None:
    """List the known principal names as JSON."""
    names = run(in_store(load_settings(**options), lambda s: s.list_user_names()))
    rows = [{"upn": upn, "userId": user, "pinned": pinned} for upn, user, pinned in names]
    click.echo(json.dumps(rows, indent=2))


@user_group.command("remove")
@click.option("--upn", required=True, help="The user principal name to forget.")
@common_options
def remove_name(upn: str, **options: str | None) -> None:
    """Forget a principal name (a token naming it teaches it again, unpinned)."""
    name = principal_name(upn)
    if not run(in_store(load_settings(**options), lambda s: s.forget_user_name(name))):
        raise click.ClickException(f"no user is named {name!r}")
    click.echo(json.dumps({"removed": name}))


def register(group: click.Group) -> None:
    group.add_command(user_group)
