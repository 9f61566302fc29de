"""The official Microsoft Graph beta SDK for Python, unmodified, against a running Herald.

The SDK only needs to be pointed at Herald's base URL and given a token: the token comes from
Herald's own issuer (delegated, via the CLI's issuer) and from its client-credentials endpoint
(app-only), exactly as an app server would obtain them.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from kiota_abstractions.api_error import APIError
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_abstractions.base_request_configuration import RequestConfiguration
from msgraph_beta import GraphServiceClient
from msgraph_beta import graph_request_adapter as sdk_adapter
from msgraph_beta.generated.models.notification import Notification
from msgraph_beta.generated.models.payload_types import PayloadTypes
from msgraph_beta.generated.models.priority import Priority
from msgraph_beta.generated.models.target_policy_endpoints import TargetPolicyEndpoints
from msgraph_beta.generated.models.visual_properties import VisualProperties
from msgraph_beta.generated.users.item.notifications.notifications_request_builder import (
    NotificationsRequestBuilder,
)
from msgraph_beta.graph_request_adapter import GraphRequestAdapter
from msgraph_core import GraphClientFactory

from tests.conftest import RegisteredApp, Server

Query = NotificationsRequestBuilder.NotificationsRequestBuilderGetQueryParameters


class StaticToken(AccessTokenProvider):  # type: ignore[misc]
    def __init__(self, token: str, host: str) -> None:
        self.token = token
        self.hosts = AllowedHostsValidator([host])

    async def get_authorization_token(
        self, uri: str, additional_authentication_context: dict[str, Any] | None = None
    ) -> str:
        return self.token

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return self.hosts


@contextlib.asynccontextmanager
async def graph_client(server: Server, token: str) -> AsyncIterator[GraphServiceClient]:
    """The SDK's own client and middleware, with Herald as base URL and a bearer token."""
    host = urlsplit(server.base_url).hostname or "127.0.0.1"
    # Our own transport, so we can close its pool: the SDK's wrapper transport does not.
    transport = httpx.AsyncHTTPTransport()
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(transport=transport), options=sdk_adapter.options
    )
    auth = BaseBearerTokenAuthenticationProvider(StaticToken(token, host))
    adapter = GraphRequestAdapter(auth, client=http)
    adapter.base_url = f"{server.base_url}/beta"
    try:
        yield GraphServiceClient(request_adapter=adapter)
    finally:
        await http.aclose()
        await transport.aclose()


def notification(app: RegisteredApp, app_id: str, group: str, title: str) -> Notification:
    return Notification(
        target_host_name=app.host_name,
        group_name=group,
        priority=Priority.High,
        display_time_to_live=23,
        expiration_date_time=datetime.now(UTC) + timedelta(days=2),
        payload=PayloadTypes(visual_content=VisualProperties(title=title, body="from the SDK")),
        target_policy=TargetPolicyEndpoints(platform_types=["windows", "iOS"]),
        additional_data={"appNotificationId": app_id},
    )


async def exercise(notifications: NotificationsRequestBuilder, app: RegisteredApp) -> None:
    """Create, replace, list ($top/$filter/$count), count, get, patch and delete."""
    created = await notifications.post(notification(app, "sdk-1", "g", "first"))
    assert created is not None and created.id
    assert created.priority == Priority.High and created.display_time_to_live == 23
    assert created.additional_data["readState"] == "unread"
    await notifications.post(notification(app, "sdk-2", "other", "second"))

    replaced = await notifications.post(notification(app, "sdk-1", "g", "first, again"))
    assert replaced is not None and replaced.id == created.id
    assert replaced.payload.visual_content.title == "first, again"

    query = Query(top=1, filter="groupName eq 'g'", count=True)
    config = RequestConfiguration(query_parameters=query)
    page = await notifications.get(request_configuration=config)
    assert page is not None and page.odata_count == 1
    assert [n.id for n in page.value] == [created.id]
    everything = await notifications.get(
        request_configuration=RequestConfiguration(query_parameters=Query(top=1, count=True))
    )
    assert everything.odata_count == 2 and len(everything.value) == 1
    assert everything.odata_next_link
    assert await notifications.count.get() == 2

    item = notifications.by_notification_id(created.id)
    fetched = await item.get()
    assert fetched is not None and fetched.group_name == "g"
    patched = await item.patch(Notification(additional_data={"readState": "read"}))
    assert patched is not None and patched.additional_data["readState"] == "read"
    await item.delete()
    with pytest.raises(APIError) as missing:
        await item.get()
    assert missing.value.response_status_code == 404
    assert await notifications.count.get() == 1


async def test_sdk_on_me_notifications(server: Server, app: RegisteredApp) -> None:
    async with graph_client(server, server.token(app, f"sdk-{uuid.uuid4()}")) as client:
        await exercise(client.me().notifications, app)


async def test_sdk_on_users_notifications_with_app_only_token(
    server: Server, app: RegisteredApp
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        grant = await http.post(
            "/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": app.client_id,
                "client_secret": app.client_secret,
                "scope": "api://herald/.default",
            },
        )
    assert grant.status_code == 200, grant.text
    user = f"sdk-{uuid.uuid4()}"
    async with graph_client(server, grant.json()["access_token"]) as client:
        await exercise(client.users.by_user_id(user).notifications, app)


async def test_sdk_sees_graph_errors(server: Server, app: RegisteredApp) -> None:
    bad = notification(app, "x", "g", "t")
    bad.target_host_name = "not-mine.example.com"
    async with graph_client(server, server.token(app, "sdk-errors")) as client:
        with pytest.raises(APIError) as denied:
            await client.me().notifications.post(bad)
    assert denied.value.response_status_code == 403
