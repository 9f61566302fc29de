"""`herald config check|defaults`: validate configuration, print the defaults."""

from __future__ import annotations

from pathlib import Path

import click

from herald.cli.command import common_options, run
from herald.errors import HeraldError
from herald.settings import FIELDS, ConfigError, Settings, load
from herald.store import open_store


@click.group("config")
def config_group() -> None:
    """Check configuration."""


@config_group.command("check")
@click.option("--strict", is_flag=True, help="Fail on unknown keys and variables too.")
@common_options
def check(strict: bool, config: str | None, **flags: str | None) -> None:
    """Load the configuration as `herald serve` would, open the store (and Redis, with the Redis
    broker), and report problems."""
    try:
        loaded = load({k: v for k, v in flags.items() if v}, file=Path(config) if config else None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    for problem in loaded.unknown:
        click.echo(f"warning: {problem}", err=True)
    if strict and loaded.unknown:
        raise click.ClickException(f"{len(loaded.unknown)} unknown option(s)")
    s = loaded.settings
    where = s.resolved_store_url.split("@")[-1]  # never print a password
    try:
        run(_ping(s.resolved_store_url))
    except (HeraldError, OSError, ValueError) as exc:
        raise click.ClickException(f"store {where}: {exc}") from exc
    if s.broker == "redis":
        redis_where = s.redis_url.split("@")[-1]
        try:
            run(_ping_redis(s.redis_url))
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"redis {redis_where}: {exc}") from exc
        where += f", redis {redis_where}"
    click.echo(f"ok: store {where} answers, listening on {s.base_url}")


async def _ping(url: str) -> None:
    store = open_store(url)
    await store.open()
    try:
        await store.ping()
    finally:
        await store.close()


async def _ping_redis(url: str) -> None:
    # Imported here: the redis extra is optional, and settings already refused broker 'redis'
    # without it.
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        await client.ping()
    except RedisError as exc:
        raise OSError(str(exc) or type(exc).__name__) from exc
    finally:
        await client.aclose()


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
