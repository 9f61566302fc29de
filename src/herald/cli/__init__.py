"""The `herald` command line. One module per command group; every command takes the same
`--data`, `--store` and `--config` options and loads settings through `load_settings`
(`command.py`)."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="herald")
def main() -> None:
    """Herald: a self-hosted, Graph-compatible notification service."""


def _register() -> None:
    from herald.cli import apps, config, listen, push_credentials, send, serve, signin, token, users

    for module in (serve, apps, push_credentials, token, signin, send, listen, config, users):
        module.register(main)


_register()
