"""`herald config check|defaults`: validate configuration, print the defaults."""

from __future__ import annotations

from pathlib import Path

import click

from herald.settings import FIELDS, ConfigError, Settings, load


@click.group("config")
def config_group() -> None:
    """Check configuration."""


@config_group.command("check")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file (HERALD_CONFIG).")
@click.option("--strict", is_flag=True, help="Fail on unknown keys and variables too.")
def check(config: str | None, strict: bool) -> None:
    """Load the configuration as `herald serve` would and report problems."""
    try:
        loaded = load(file=Path(config) if config else None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    for problem in loaded.unknown:
        click.echo(f"warning: {problem}", err=True)
    if strict and loaded.unknown:
        raise click.ClickException(f"{len(loaded.unknown)} unknown option(s)")
    s = loaded.settings
    click.echo(f"ok: store {s.resolved_store_url.split('@')[-1]}, listening on {s.base_url}")


@config_group.command("defaults")
def defaults() -> None:
    """Print every option with its default, as TOML."""
    base = Settings()
    for name in FIELDS:
        value = getattr(base, name)
        if isinstance(value, tuple):
            click.echo(f"# {name} = []")
        elif isinstance(value, bool):
            click.echo(f"{name} = {str(value).lower()}")
        elif isinstance(value, int | float):
            click.echo(f"{name} = {value}")
        else:
            click.echo(f'{name} = "{value}"')


def register(group: click.Group) -> None:
    group.add_command(config_group)
