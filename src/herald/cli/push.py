"""`herald app push-key|push-set|push-show|push-unset`: an app's push credentials.

Secrets are read from files (or prompted for), stored with the data, and never printed back.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from herald.cli import common_options, load_settings, run
from herald.cli.apps import app_group
from herald.delivery import apns, fcm, webpush, wns
from herald.errors import HeraldError
from herald.model import App
from herald.settings import Settings
from herald.store import Store, open_store

T = TypeVar("T")
KINDS = {"webpush": webpush.KIND, "apns": apns.KIND, "fcm": fcm.KIND, "wns": wns.KIND}


async def _with_app(settings: Settings, name: str, job: Callable[[Store, App], Awaitable[T]]) -> T:
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

    async def job(store: Store, app: App) -> None:
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

    async def job(store: Store, found: App) -> str:
        pem = await store.put_push_credentials(
            found.host_name, webpush.KIND, webpush.generate_key(), replace=False
        )
        return webpush.public_key(pem)

    click.echo(run(_with_app(settings, app, job)))


@app_group.group("push-set")
def push_set() -> None:
    """Set the app's credentials for one push service."""


@push_set.command("apns")
@click.argument("app")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="The .p8 signing key from Apple.",
)
@click.option("--key-id", required=True, help="The key's id (10 characters).")
@click.option("--team-id", required=True, help="The Apple developer team id.")
@click.option("--topic", required=True, help="The app's bundle id.")
@click.option(
    "--environment",
    type=click.Choice(["production", "development"]),
    default="production",
    show_default=True,
)
@common_options
def set_apns(
    app: str,
    key_file: str,
    key_id: str,
    team_id: str,
    topic: str,
    environment: str,
    **options: Any,
) -> None:
    """APNs token authentication."""
    creds = apns.ApnsCredentials(
        key_id=key_id,
        team_id=team_id,
        private_key=Path(key_file).read_text(),
        topic=topic,
        environment=environment,
    )
    try:
        apns.check(creds)
    except ValueError as exc:
        raise click.BadParameter(f"not a usable .p8 key: {exc}", param_hint="--key-file") from exc
    _store(options, app, apns.KIND, msgspec.json.encode(creds))


@push_set.command("fcm")
@click.argument("app")
@click.option(
    "--service-account",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="The Firebase service account JSON file.",
)
@common_options
def set_fcm(app: str, service_account: str, **options: Any) -> None:
    """FCM HTTP v1 with a service account."""
    try:
        info = json.loads(Path(service_account).read_text())
        fcm.check(info)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--service-account") from exc
    _store(options, app, fcm.KIND, msgspec.json.encode(info))


@push_set.command("wns")
@click.argument("app")
@click.option("--client-id", required=True, help="The package SID (ms-app://…).")
@click.option("--client-secret", prompt=True, hide_input=True, help="The client secret.")
@common_options
def set_wns(app: str, client_id: str, client_secret: str, **options: Any) -> None:
    """WNS client credentials."""
    creds = wns.WnsCredentials(client_id=client_id, client_secret=client_secret)
    _store(options, app, wns.KIND, msgspec.json.encode(creds))


@push_set.command("webpush")
@click.argument("app")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="An existing VAPID private key (PEM), e.g. from another server.",
)
@common_options
def set_webpush(app: str, key_file: str, **options: Any) -> None:
    """Replace the app's VAPID key (existing browser subscriptions stop working unless they
    were made with this key)."""
    pem = Path(key_file).read_bytes()
    try:
        webpush.public_key(pem)
    except (ValueError, TypeError, AssertionError) as exc:
        raise click.BadParameter("not a P-256 private key (PEM)", param_hint="--key-file") from exc
    _store(options, app, webpush.KIND, pem)


@app_group.command("push-show")
@click.argument("app")
@common_options
def push_show(app: str, **options: Any) -> None:
    """Print which push credentials the app has, as JSON (never a secret)."""
    settings = load_settings(**options)

    async def job(store: Store, found: App) -> dict[str, Any]:
        return _describe(await store.get_push_credentials(found.host_name))

    click.echo(json.dumps(run(_with_app(settings, app, job)), indent=2))


def _describe(stored: dict[str, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if webpush.KIND in stored:
        out["webPush"] = {"applicationServerKey": webpush.public_key(stored[webpush.KIND])}
    if apns.KIND in stored:
        a = msgspec.json.decode(stored[apns.KIND], type=apns.ApnsCredentials)
        out["apns"] = {
            "keyId": a.key_id,
            "teamId": a.team_id,
            "topic": a.topic,
            "environment": a.environment,
        }
    if fcm.KIND in stored:
        f = msgspec.json.decode(stored[fcm.KIND])
        out["fcm"] = {"projectId": f.get("project_id"), "clientEmail": f.get("client_email")}
    if wns.KIND in stored:
        w = msgspec.json.decode(stored[wns.KIND], type=wns.WnsCredentials)
        out["wns"] = {"clientId": w.client_id}
    return out


@app_group.command("push-unset")
@click.argument("app")
@click.argument("provider", type=click.Choice(sorted(KINDS)))
@common_options
def push_unset(app: str, provider: str, **options: Any) -> None:
    """Remove the app's credentials for one push service."""
    settings = load_settings(**options)

    async def job(store: Store, found: App) -> bool:
        return await store.delete_push_credentials(found.host_name, KINDS[provider])

    if not run(_with_app(settings, app, job)):
        raise click.ClickException(f"the app has no {provider} credentials")
    click.echo(f"removed the app's {provider} credentials")


def register(group: click.Group) -> None:
    """The commands live in the `app` group (registered by cli/apps.py)."""
