"""`herald serve`: run the server (embedded default: SQLite under --data, its own issuer)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import click

from herald.cli.command import common_options, load_settings
from herald.logs import configure
from herald.settings import Settings, load

log = logging.getLogger("herald.serve")


@click.command()
@click.option("--host", help="Interface to listen on (HERALD_HOST, default 127.0.0.1).")
@click.option("--port", type=int, help="Port (HERALD_PORT, default 8080).")
@click.option(
    "--workers", type=int, help="Worker processes on the port (HERALD_WORKERS, default 1)."
)
@common_options
def serve(host: str | None, port: int | None, workers: int | None, **options: str | None) -> None:
    """Start the HTTP server.

    With --workers N (N > 1), SIGHUP to the server (the supervisor) restarts the workers one at a
    time, each replacement serving before its predecessor drains, with the config file read
    again: how a changed setting is applied without a moment off the port (docs/deployment.md).
    """
    settings = load_settings(host=host, port=port, workers=workers, **options)
    configure(
        settings.log_level, settings.log_format, settings.log_repeats, settings.log_repeat_window
    )
    click.echo(f"herald: serving on {settings.base_url} (store {_redacted(settings)})", err=True)
    if settings.workers > 1:
        from herald.supervisor import supervise

        flags = {"host": host, "port": port, "workers": workers, **options}
        supervise(settings, partial(reload, flags))
        return
    from herald.api.app import build_app
    from herald.server import Server, config, raise_open_files_limit
    from herald.service import build_services

    raise_open_files_limit()
    app = build_app(build_services(settings))
    Server(config(app, settings.host, settings.port, access_log=False, log_config=None)).run()


def reload(flags: dict[str, Any]) -> Settings:
    """The settings again, the config file read anew (SIGHUP: a rolling restart of the workers);
    raises ConfigError."""
    flags = dict(flags)
    config = flags.pop("config", None)
    loaded = load(flags, file=Path(config) if config else None)
    for problem in loaded.unknown:
        log.warning("%s", problem)
    return loaded.settings


def _redacted(settings: object) -> str:
    from urllib.parse import urlsplit

    url: str = getattr(settings, "resolved_store_url")  # noqa: B009
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def register(group: click.Group) -> None:
    group.add_command(serve)
