"""What every command shares: the `--config`, `--data` and `--store` options, loading settings
from them, and running a coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from herald.settings import ConfigError, Settings, load

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def common_options(command: F) -> F:
    """--config, --data and --store, accepted by every command."""
    command = click.option("--store", "store_url", help="Store URL (HERALD_STORE_URL).")(command)
    command = click.option(
        "--data", type=click.Path(file_okay=False), help="Data directory (HERALD_DATA)."
    )(command)
    return click.option(
        "--config", type=click.Path(dir_okay=False), help="TOML config file (HERALD_CONFIG)."
    )(command)


def load_settings(config: str | None = None, **flags: Any) -> Settings:
    """Settings from flags > HERALD_* > --config/HERALD_CONFIG file > defaults."""
    try:
        loaded = load(flags, file=Path(config) if config else None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    for problem in loaded.unknown:
        click.echo(f"warning: {problem}", err=True)
    return loaded.settings


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
