"""`herald app push-key|push-set|push-show|push-unset`: an app's push credentials.

Secrets are read from files (or prompted for), stored with the data, and never printed back.
What each provider accepts, and how it is checked and shown, is its entry in the provider table
(`herald.outbound.providers`): one `push-set` command per entry.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from herald.cli.apps import app_group
from herald.cli.command import common_options, load_settings, run
from herald.errors import HeraldError
from herald.model import App
from herald.outbound.providers import PROVIDERS, webpush
from herald.outbound.providers.table import Entry, Option, Unusable
from herald.settings import Settings
from herald.store import PushCredentials, open_store

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


async def _with_app(
    settings: Settings, name: str, job: Callable[[PushCredentials, App], Awaitable[T]]
) -> T:
    """Run `job` with the app named by client id or host name."""
    settings.data.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.resolved_store_url, settings)
    await store.open()
    try:
        app = await store.get_app(name)
        if app is None:
            app = next((a for a in await store.list_apps() if a.host_name == name.lower()), None)
        if app is None:
            raise click.ClickException(f"no app {name!r} (client id or host name)")
        return await job(store, app)
    except HeraldError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        await store.close()


def _store(options: dict[str, Any], name: str, kind: str, secret: bytes) -> None:
    settings = load_settings(**options)

    async def job(store: PushCredentials, app: App) -> None:
        await store.put_push_credentials(app.host_name, kind, secret)

    run(_with_app(settings, name, job))
    click.echo(f"stored {kind} credentials for the app; a running server uses them within 30 s")


@app_group.command("push-key")
@click.argument("app")
@common_options
def push_key(app: str, **options: Any) -> None:
    """Print the app's VAPID public key (a browser's applicationServerKey); generate it first
    if the app has none."""
    settings = load_settings(**options)

    async def job(store: PushCredentials, found: App) -> str:
        pem = await store.put_push_credentials(
            found.host_name, webpush.KIND, webpush.generate_key(), replace=False
        )
        return webpush.public_key(pem)

    click.echo(run(_with_app(settings, app, job)))


@app_group.group("push-set")
def push_set() -> None:
    """Set the app's credentials for one push service."""


def _setter(entry: Entry) -> click.Command:
    """`herald app push-set <provider> APP [its options]`, from the provider's entry."""
    creds = entry.credentials

    def command(app: str, **values: Any) -> None:
        given = {o.name: values.pop(o.name) for o in creds.options}
        try:
            secret = creds.load(given)
        except Unusable as exc:
            raise click.BadParameter(str(exc), param_hint=exc.option) from exc
        _store(values, app, creds.kind, secret)

    for option in reversed(creds.options):
        command = _option(option)(command)
    command = click.argument("app")(command)
    return click.command(entry.name, help=creds.summary)(common_options(command))


def _option(option: Option) -> Callable[[F], F]:
    kind: click.ParamType[Any] | None = None  # text
    if option.file:
        kind = click.Path(dir_okay=False, exists=True)
    elif option.choices:
        kind = click.Choice(option.choices)
    return click.option(
        option.flag,
        type=kind,
        required=option.default is None and not option.secret,
        default=option.default,
        show_default=option.default is not None,
        prompt=option.secret,
        hide_input=option.secret,
        help=option.help,
    )


for _entry in PROVIDERS:
    push_set.add_command(_setter(_entry))


@app_group.command("push-show")
@click.argument("app")
@common_options
def push_show(app: str, **options: Any) -> None:
    """Print which push credentials the app has, as JSON (never a secret)."""
    settings = load_settings(**options)

    async def job(store: PushCredentials, found: App) -> dict[str, Any]:
        return _describe(await store.get_push_credentials(found.host_name))

    click.echo(json.dumps(run(_with_app(settings, app, job)), indent=2))


def _describe(stored: dict[str, bytes]) -> dict[str, Any]:
    return {
        entry.provider.value: entry.credentials.describe(stored[entry.credentials.kind])
        for entry in PROVIDERS
        if entry.credentials.kind in stored
    }


@app_group.command("push-unset")
@click.argument("app")
@click.argument("provider", type=click.Choice(sorted(PROVIDERS.names)))
@common_options
def push_unset(app: str, provider: str, **options: Any) -> None:
    """Remove the app's credentials for one push service."""
    settings = load_settings(**options)

    async def job(store: PushCredentials, found: App) -> bool:
        kind = PROVIDERS.names[provider].credentials.kind
        return await store.delete_push_credentials(found.host_name, kind)

    if not run(_with_app(settings, app, job)):
        raise click.ClickException(f"the app has no {provider} credentials")
    click.echo(f"removed the app's {provider} credentials")


def register(group: click.Group) -> None:
    """The commands live in the `app` group (registered by cli/apps.py)."""
