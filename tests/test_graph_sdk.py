"""The official Microsoft Graph beta SDK for Python, unmodified, against a running Herald.

The SDK only needs to be pointed at Herald's base URL and given a token: the token comes from
Herald's own issuer (delegated, via the CLI's issuer) and from its client-credentials endpoint
(app-only), exactly as an app server would obtain them.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
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
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation
from kiota_serialization_json.json_parse_node_factory import JsonParseNodeFactory
from msgraph_beta import GraphServiceClient
from msgraph_beta import graph_request_adapter as sdk_adapter
from msgraph_beta.generated.models.notification import Notification
from msgraph_beta.generated.models.notification_collection_response import (
    NotificationCollectionResponse,
)
from msgraph_beta.generated.models.payload_types import PayloadTypes
from msgraph_beta.generated.models.priority import Priority
from msgraph_beta.generated.models.target_policy_endpoints import TargetPolicyEndpoints
from msgraph_beta.generated.models.visual_properties import VisualProperties
from msgraph_beta.generated.users.item.notifications.notifications_request_builder import (
    NotificationsRequestBuilder,
)
from msgraph_beta.graph_request_adapter import GraphRequestAdapter
from msgraph_core import GraphClientFactory
from msgraph_core.requests.batch_request_builder import BatchRequestBuilder
from msgraph_core.requests.batch_request_content import BatchRequestContent
from msgraph_core.requests.batch_request_item import BatchRequestItem

from tests.conftest import RegisteredApp, Server

Query = NotificationsRequestBuilder.NotificationsRequestBuilderGetQueryParameters
T = TypeVar("T")


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


# -- the SDK's other everyday patterns -----------------------------------------------------------


async def test_sdk_batch_two_creates_and_a_list(server: Server, app: RegisteredApp) -> None:
    """msgraph-core's BatchRequestBuilder, items built as its docs show: from the request
    builders (relative URLs, JSON bodies) and from a RequestInformation with an absolute URL;
    `depends_on` chains them."""
    async with graph_client(server, server.token(app, f"sdk-{uuid.uuid4()}")) as client:
        feed = client.me().notifications
        first = BatchRequestItem(
            feed.to_post_request_information(notification(app, "b-1", "batch", "one"))
        )
        second = BatchRequestItem(
            feed.to_post_request_information(notification(app, "b-2", "batch", "two")),
            depends_on=[first],
        )
        listing = RequestInformation(Method.GET)
        listing.url = f"{server.base_url}/beta/me/notifications?$filter=groupName eq 'batch'"
        third = BatchRequestItem(listing, depends_on=[second])
        content = BatchRequestContent({item.id: item for item in (first, second, third)})
        adapter = client.request_adapter
        # The SDK's request, sent by the SDK's adapter; read raw, because this SDK's batch
        # response parser drops JSON bodies (microsoft/kiota-python#737): the statuses come
        # through BatchResponseContent below, the bodies through the SDK's JSON parse nodes.
        request = await BatchRequestBuilder(adapter).to_post_request_information(content)
        raw = await adapter.send_primitive_async(request, "bytes", {})
        answers = {a["id"]: a for a in json.loads(raw)["responses"]}
        assert [answers[i.id]["status"] for i in (first, second, third)] == [201, 201, 200]
        one, two = (parse(answers[i.id]["body"], Notification) for i in (first, second))
        assert one.payload.visual_content.title == "one" and one.group_name == "batch"
        assert two.additional_data["appNotificationId"] == "b-2"
        location = {k.lower(): v for k, v in answers[first.id]["headers"].items()}["location"]
        assert location.endswith(f"/notifications/{one.id}")
        page = parse(answers[third.id]["body"], NotificationCollectionResponse)
        assert sorted(n.id for n in page.value) == sorted([one.id, two.id])

        gets = [BatchRequestItem(feed.by_notification_id(one.id).to_get_request_information())]
        gets.append(BatchRequestItem(feed.by_notification_id("nope").to_get_request_information()))
        result = await BatchRequestBuilder(adapter).post(
            BatchRequestContent({g.id: g for g in gets})
        )
        assert result.get_response_status_codes() == {gets[0].id: 200, gets[1].id: 404}


def parse(body: dict[str, Any], kind: type[T]) -> T:
    node = JsonParseNodeFactory().get_root_parse_node("application/json", json.dumps(body).encode())
    value = node.get_object_value(kind)
    assert value is not None
    return value


async def test_sdk_get_modify_patch(server: Server, app: RegisteredApp) -> None:
    """GET a notification, change it, PATCH the whole object back: the SDK sends the
    annotations and read-only values it received, unchanged."""
    async with graph_client(server, server.token(app, f"sdk-{uuid.uuid4()}")) as client:
        feed = client.me().notifications
        made = notification(app, "gmp", "before", "title")
        made.additional_data["orderRef"] = "A-17"  # the type is open: kept, echoed
        created = await feed.post(made)
        assert created is not None and created.additional_data["orderRef"] == "A-17"
        item = feed.by_notification_id(created.id)
        fetched = await item.get()
        assert fetched is not None and "@odata.context" in fetched.additional_data
        fetched.group_name = "after"
        fetched.additional_data["readState"] = "read"
        fetched.additional_data["orderRef"] = "A-18"
        patched = await item.patch(fetched)
        assert patched is not None and patched.group_name == "after"
        assert patched.additional_data["readState"] == "read"
        assert patched.additional_data["orderRef"] == "A-18"
        assert patched.additional_data["@odata.etag"] == 'W/"2"'

        stale = await item.get()
        assert stale is not None
        stale.target_host_name = "not-mine.example.com"
        with pytest.raises(APIError) as refused:
            await item.patch(stale)
        assert refused.value.response_status_code == 400

        minimal = RequestConfiguration()
        minimal.headers.add("Prefer", "return=minimal")
        again = await item.get()
        assert again is not None
        again.additional_data["userActionState"] = "dismissed"
        assert await item.patch(again, request_configuration=minimal) is None  # 204
        final = await item.get()
        assert final is not None and final.additional_data["userActionState"] == "dismissed"
        assert final.group_name == "after"


async def test_sdk_delta_through_its_request_builder(server: Server, app: RegisteredApp) -> None:
    """The beta SDK generates no delta builder for notifications; its request builder follows
    the delta function's URL and then the deltaLink (`with_url`), as Graph's docs do it."""
    async with graph_client(server, server.token(app, f"sdk-{uuid.uuid4()}")) as client:
        feed = client.me().notifications
        kept = await feed.post(notification(app, "d-1", "g", "kept"))
        gone = await feed.post(notification(app, "d-2", "g", "gone"))
        assert kept is not None and gone is not None
        start = feed.with_url(f"{server.base_url}/beta/me/notifications/microsoft.graph.delta()")
        page = await start.get()
        assert page is not None and sorted(n.id for n in page.value) == sorted([kept.id, gone.id])
        link = page.additional_data["@odata.deltaLink"]
        assert "microsoft.graph.delta()" in link

        await feed.by_notification_id(kept.id).patch(
            Notification(additional_data={"readState": "read"})
        )
        await feed.by_notification_id(gone.id).delete()
        later = await feed.with_url(link).get()
        assert later is not None
        changed = {n.id: n for n in later.value}
        assert changed[kept.id].additional_data["readState"] == "read"
        assert changed[gone.id].additional_data["@removed"] == {"reason": "deleted"}
        last = await feed.with_url(later.additional_data["@odata.deltaLink"]).get()
        assert last is not None and last.value == []
