"""Who calls the app-wide resources (`notificationChanges`, `notificationWebhooks`): an app
server, with an app-only token (client credentials, docs/auth.md). A delegated token acts for one
user and may not read every user's changes."""

from __future__ import annotations

from starlette.requests import Request

from herald.api.requests import services
from herald.errors import AccessDenied
from herald.model import App


async def app_caller(request: Request) -> App:
    access = services(request).access
    principal = await access.principal(request.headers.get("authorization"))
    if principal.user_id is not None:
        raise AccessDenied(
            "The app-wide change feed and webhooks take an app-only token (client credentials),"
            " not a user's."
        )
    app = await access.apps.get(principal.client_id)
    if app is None:
        raise AccessDenied(f"The app '{principal.client_id}' is not registered with Herald.")
    await access.limits.check(app.host_name, None)
    return app
