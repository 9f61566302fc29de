"""The notification resource over real HTTP against a running Herald."""

from __future__ import annotations

import gzip
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import RegisteredApp, Server

SEED = {
    "targetHostName": "",
    "appNotificationId": "testDirectToastNotification",
    "payload": {"visualContent": {"title": "Hello Ignite!", "body": "Notifications are Great!"}},
    "targetPolicy": {"platformTypes": ["windows"]},
    "priority": "High",
    "groupName": "TestGroup",
    "displayTimeToLive": "23",
}


def body(app: RegisteredApp, **overrides: Any) -> dict[str, Any]:
    data = {**SEED, "targetHostName": app.host_name, "appNotificationId": str(uuid.uuid4())}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture
def client(server: Server, app: RegisteredApp, user: str) -> httpx.Client:
    return server.client(server.token(app, user))


def test_seed_example_is_created_with_canonical_echo(
    client: httpx.Client, app: RegisteredApp, server: Server, user: str
) -> None:
    r = client.post("/beta/me/notifications", json=body(app), headers={"client-request-id": "c1"})
    assert r.status_code == 201, r.text
    n = r.json()
    assert n["displayTimeToLive"] == 23
    assert n["priority"] == "High"
    assert n["targetPolicy"] == {"platformTypes": ["windows"]}
    assert n["readState"] == "unread" and n["userActionState"] == "none"
    assert n["groupName"] == "TestGroup"
    assert n["payload"]["visualContent"]["title"] == "Hello Ignite!"
    assert n["@odata.context"].endswith(f"/beta/$metadata#users('{user}')/notifications/$entity")
    assert r.headers["location"] == f"{server.base_url}/beta/users/{user}/notifications/{n['id']}"
    assert r.headers["etag"] == n["@odata.etag"]
    assert r.headers["client-request-id"] == "c1" and r.headers["request-id"]
    uuid.UUID(n["id"])
    expires = datetime.fromisoformat(n["expirationDateTime"])
    assert timedelta(days=6.99) < expires - datetime.now(UTC) <= timedelta(days=7)


def test_defaults(client: httpx.Client, app: RegisteredApp) -> None:
    raw = {"targetHostName": app.host_name, "payload": {"rawContent": "ping"}}
    n = client.post("/beta/me/notifications", json=raw).json()
    assert n["appNotificationId"] == n["id"]
    assert n["priority"] == "None"
    assert n["targetPolicy"]["platformTypes"] == ["windows", "iOS", "android", "webPush"]
    assert n["groupName"] is None and n["displayTimeToLive"] is None
    assert n["payload"] == {"rawContent": "ping"}


def test_case_insensitive_names_and_ordinals(client: httpx.Client, app: RegisteredApp) -> None:
    data = body(app, priority=2, targetPolicy={"platformTypes": ["IOS", "WEBPUSH"]})
    n = client.post("/beta/me/notifications", json=data).json()
    assert n["priority"] == "Low"
    assert n["targetPolicy"]["platformTypes"] == ["iOS", "webPush"]
    n = client.post("/v1.0/me/notifications", json=body(app, priority="high")).json()
    assert n["priority"] == "High"


def test_replace_keeps_id_and_resets_state(client: httpx.Client, app: RegisteredApp) -> None:
    first = client.post("/beta/me/notifications", json=body(app, appNotificationId="x")).json()
    patched = client.patch(f"/beta/me/notifications/{first['id']}", json={"readState": "read"})
    assert patched.json()["readState"] == "read"
    again = client.post(
        "/beta/me/notifications",
        json=body(app, appNotificationId="x", payload={"rawContent": "v2"}),
    )
    assert again.status_code == 200
    n = again.json()
    assert n["id"] == first["id"] and n["createdDateTime"] == first["createdDateTime"]
    assert n["readState"] == "unread" and n["payload"] == {"rawContent": "v2"}
    assert n["@odata.etag"] != first["@odata.etag"]
    assert "location" not in again.headers


def test_get_patch_delete_roundtrip(client: httpx.Client, app: RegisteredApp) -> None:
    n = client.post("/beta/me/notifications", json=body(app)).json()
    url = f"/beta/me/notifications/{n['id']}"
    assert client.get(url).json() == n
    r = client.patch(url, json={"userActionState": "Dismissed", "readState": "Read"})
    assert r.status_code == 200
    assert r.json()["userActionState"] == "dismissed" and r.json()["readState"] == "read"
    assert r.json()["lastModifiedDateTime"] >= n["lastModifiedDateTime"]
    assert client.delete(url).status_code == 204
    gone = client.get(url)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "itemNotFound"
    assert client.delete(url).status_code == 404


def test_if_match(client: httpx.Client, app: RegisteredApp) -> None:
    n = client.post("/beta/me/notifications", json=body(app)).json()
    url = f"/beta/me/notifications/{n['id']}"
    ok = client.patch(url, json={"readState": "read"}, headers={"If-Match": n["@odata.etag"]})
    assert ok.status_code == 200
    stale = client.patch(url, json={"readState": "unread"}, headers={"If-Match": n["@odata.etag"]})
    assert stale.status_code == 412 and stale.json()["error"]["code"] == "preconditionFailed"
    assert client.get(url).json()["readState"] == "read"
    assert client.delete(url, headers={"If-Match": n["@odata.etag"]}).status_code == 412
    assert client.delete(url, headers={"If-Match": ok.json()["@odata.etag"]}).status_code == 204


def test_content_patch(client: httpx.Client, app: RegisteredApp) -> None:
    n = client.post("/beta/me/notifications", json=body(app)).json()
    url = f"/beta/me/notifications/{n['id']}"
    r = client.patch(url, json={"payload": {"rawContent": "new"}, "priority": "Low"})
    assert r.json()["payload"] == {"rawContent": "new"} and r.json()["priority"] == "Low"


def test_list_filter_order_paging_count_select(client: httpx.Client, app: RegisteredApp) -> None:
    for i in range(5):
        group = "even" if i % 2 == 0 else "odd"
        client.post(
            "/beta/me/notifications", json=body(app, groupName=group, appNotificationId=f"n{i}")
        )
    r = client.get("/beta/me/notifications", params={"$top": "2", "$count": "true"})
    page = r.json()
    assert page["@odata.count"] == 5 and len(page["value"]) == 2
    assert [n["appNotificationId"] for n in page["value"]] == ["n4", "n3"]
    seen = [n["appNotificationId"] for n in page["value"]]
    while "@odata.nextLink" in page:
        page = client.get(page["@odata.nextLink"]).json()
        seen += [n["appNotificationId"] for n in page["value"]]
    assert seen == ["n4", "n3", "n2", "n1", "n0"]
    evens = client.get(
        "/beta/me/notifications",
        params={"$filter": "groupName eq 'even'", "$orderby": "createdDateTime asc"},
    ).json()["value"]
    assert [n["appNotificationId"] for n in evens] == ["n0", "n2", "n4"]
    assert client.get("/beta/me/notifications/$count").text == "5"
    odd = client.get("/beta/me/notifications/$count", params={"$filter": "groupName eq 'odd'"})
    assert odd.text == "2" and odd.headers["content-type"].startswith("text/plain")
    sel = client.get("/beta/me/notifications", params={"$select": "groupName", "$top": "1"})
    assert set(sel.json()["value"][0]) == {"id", "@odata.etag", "groupName"}


def test_date_filter_and_state_filter(client: httpx.Client, app: RegisteredApp) -> None:
    a = client.post("/beta/me/notifications", json=body(app)).json()
    client.post("/beta/me/notifications", json=body(app))
    client.patch(f"/beta/me/notifications/{a['id']}", json={"readState": "read"})
    read = client.get("/beta/me/notifications", params={"$filter": "readState eq 'read'"})
    assert [n["id"] for n in read.json()["value"]] == [a["id"]]
    since = client.get(
        "/beta/me/notifications", params={"$filter": f"createdDateTime gt {a['createdDateTime']}"}
    )
    assert a["id"] not in [n["id"] for n in since.json()["value"]]
    assert len(since.json()["value"]) == 1


def test_delete_group(client: httpx.Client, app: RegisteredApp) -> None:
    for _ in range(3):
        client.post("/beta/me/notifications", json=body(app, groupName="g1"))
    client.post("/beta/me/notifications", json=body(app, groupName="g2"))
    r = client.post("/beta/me/notifications/deleteGroup", json={"groupName": "g1"})
    assert r.status_code == 200 and r.json()["deletedCount"] == 3
    left = client.get("/beta/me/notifications").json()["value"]
    assert [n["groupName"] for n in left] == ["g2"]


def test_users_path_with_delegated_and_app_only_tokens(
    server: Server, app: RegisteredApp, user: str
) -> None:
    delegated = server.client(server.token(app, user))
    created = delegated.post(f"/beta/users/{user}/notifications", json=body(app))
    assert created.status_code == 201
    app_only = server.client(server.token(app, None))
    listed = app_only.get(f"/beta/users/{user}/notifications").json()["value"]
    assert [n["id"] for n in listed] == [created.json()["id"]]
    other = app_only.post(f"/beta/users/{user}-2/notifications", json=body(app))
    assert other.status_code == 201
    me = app_only.post("/beta/me/notifications", json=body(app))
    assert me.status_code == 400


def test_gzip_body(client: httpx.Client, app: RegisteredApp) -> None:
    raw = httpx.Request("POST", "/", json=body(app)).read()
    r = client.post(
        "/beta/me/notifications",
        content=gzip.compress(raw),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 201, r.text


def test_idempotency_key(client: httpx.Client, app: RegisteredApp) -> None:
    data = body(app, appNotificationId=None)
    first = client.post("/beta/me/notifications", json=data, headers={"Idempotency-Key": "k1"})
    again = client.post("/beta/me/notifications", json=data, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json() and first.headers["location"] == again.headers["location"]
    assert client.get("/beta/me/notifications/$count").text == "1"
    other = client.post("/beta/me/notifications", json=body(app), headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert client.get("/beta/me/notifications/$count").text == "1"


def test_batch(client: httpx.Client, app: RegisteredApp) -> None:
    requests = [
        {
            "id": "1",
            "method": "POST",
            "url": "/me/notifications",
            "headers": {"Content-Type": "application/json"},
            "body": body(app, appNotificationId="b1"),
        },
        {"id": "2", "method": "GET", "url": "/me/notifications?$count=true", "dependsOn": ["1"]},
        {"id": "3", "method": "GET", "url": "/me/notifications/nope", "dependsOn": ["2"]},
        {"id": "4", "method": "DELETE", "url": "/me/notifications/nope2", "dependsOn": ["3"]},
    ]
    r = client.post("/beta/$batch", json={"requests": requests})
    assert r.status_code == 200
    out = {x["id"]: x for x in r.json()["responses"]}
    assert out["1"]["status"] == 201 and out["1"]["body"]["appNotificationId"] == "b1"
    assert out["2"]["status"] == 200 and out["2"]["body"]["@odata.count"] == 1
    assert out["3"]["status"] == 404
    assert out["4"]["status"] == 424
    too_many = [{"id": str(i), "method": "GET", "url": "/me/notifications"} for i in range(21)]
    assert client.post("/beta/$batch", json={"requests": too_many}).status_code == 400


def test_batch_parallel_requests_share_auth(client: httpx.Client, app: RegisteredApp) -> None:
    requests = [
        {"id": str(i), "method": "POST", "url": "me/notifications", "body": body(app)}
        for i in range(5)
    ]
    r = client.post("/beta/$batch", json={"requests": requests})
    assert [x["status"] for x in r.json()["responses"]] == [201] * 5


# Every way an inner request could name $batch: percent-encoded (once, twice), in another case,
# absolute, under a version prefix, with extra slashes, a trailing slash, a query or a fragment.
NESTED_BATCH_URLS = [
    "/%24batch",
    "%24batch",
    "/%2524batch",
    "/$BATCH",
    "/%24Batch",
    "//$batch",
    "/beta/$batch",
    "/v1.0/%24batch",
    "https://graph.microsoft.com/v1.0/$batch",
    "https://herald.example.com/beta/%24batch",
    "/$batch/",
    "$batch?x=1",
    "/%24batch#f",
]


@pytest.mark.parametrize("url", NESTED_BATCH_URLS)
def test_a_batch_inside_a_batch_is_refused_in_any_spelling(
    client: httpx.Client, app: RegisteredApp, url: str
) -> None:
    """20 requests that each name a batch of 20 posts: the whole batch is refused and nothing
    runs (`/%24batch` used to run all 400 posts, where a batch holds at most 20)."""
    posts = [
        {"id": str(i), "method": "POST", "url": "/me/notifications", "body": body(app)}
        for i in range(20)
    ]
    nested = [
        {
            "id": str(i),
            "method": "POST",
            "url": url,
            "headers": {"Content-Type": "application/json"},
            "body": {"requests": posts},
        }
        for i in range(20)
    ]
    r = client.post("/beta/$batch", json={"requests": nested})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == "invalidRequest" and r.json()["error"]["target"] == "url"
    assert client.get("/beta/me/notifications/$count").text == "0"


def test_operations_endpoints(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200
        assert "herald_http_requests" in c.get("/metrics").text
        doc = c.get("/openapi.json").json()
        assert "/beta/me/notifications" in doc["paths"]
        assert "NotificationOut" in doc["components"]["schemas"]
        post = doc["paths"]["/beta/me/notifications"]["post"]["requestBody"]["content"]
        assert post["application/json"]["schema"]["$ref"].endswith("/NotificationCreate")
        create = doc["components"]["schemas"]["NotificationCreate"]
        # the notification type is open (docs/api.md): other properties are kept
        assert "id" not in create["properties"] and create["additionalProperties"] is True
        assert "/beta/$metadata" in doc["paths"]
        assert "/beta/me/notifications/microsoft.graph.delta()" in doc["paths"]
        assert c.get("/docs").status_code == 200


def test_rate_limit(tmp_path: Any) -> None:
    from tests.conftest import make_settings, serve_in_thread

    settings = make_settings(tmp_path, user_rate=1.0, user_burst=2)
    for url in serve_in_thread(settings):
        srv = Server(settings, url)
        app = srv.register()
        c = srv.client(srv.token(app, "u1"))
        codes = [c.get("/beta/me/notifications").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = c.get("/beta/me/notifications")
        assert r.json()["error"]["code"] == "activityLimitReached"
        assert int(r.headers["retry-after"]) >= 1
        other = srv.client(srv.token(app, "u2"))
        assert other.get("/beta/me/notifications").status_code == 200
        srv.close_clients()


def test_expiry_hides_at_once_and_the_sweeper_leaves_a_tombstone(tmp_path: Any) -> None:
    import asyncio
    import time

    from herald.model import ChangeKind
    from herald.store import open_store
    from tests.conftest import make_settings, serve_in_thread

    settings = make_settings(tmp_path, sweep_interval=0.2)
    for url in serve_in_thread(settings):
        srv = Server(settings, url)
        app = srv.register()
        c = srv.client(srv.token(app, "eve"))
        soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
        n = c.post("/beta/me/notifications", json=body(app, expirationDateTime=soon)).json()
        keep = c.post("/beta/me/notifications", json=body(app)).json()
        assert c.get(f"/beta/me/notifications/{n['id']}").status_code == 200
        time.sleep(2.0)
        assert c.get(f"/beta/me/notifications/{n['id']}").status_code == 404
        assert [x["id"] for x in c.get("/beta/me/notifications").json()["value"]] == [keep["id"]]
        assert c.get("/beta/me/notifications/$count").text == "1"
        srv.close_clients()

        async def log() -> list[tuple[ChangeKind, str]]:
            store = open_store(settings.resolved_store_url)
            await store.open()
            try:
                return [
                    (ch.kind, ch.notification_id) for ch in await store.changes("eve", None, 0, 10)
                ]
            finally:
                await store.close()

        assert asyncio.run(log()) == [
            (ChangeKind.CREATED, n["id"]),
            (ChangeKind.CREATED, keep["id"]),
            (ChangeKind.EXPIRED, n["id"]),
        ]


def test_encoded_user_ids_name_one_feed_everywhere(server: Server, app: RegisteredApp) -> None:
    c = server.client(server.token(app, None))
    path = "/beta/users/a%25b%40c/notifications"  # user "a%b@c", percent-encoded as the SDK does
    created = c.post(path, json=body(app))
    assert created.status_code == 201
    assert "/users/a%25b%40c/notifications/" in created.headers["location"]
    assert c.get(f"{path}/$count").text == "1"
    batch = c.post(
        "/beta/$batch",
        json={"requests": [{"id": "1", "method": "GET", "url": "/users/a%25b%40c/notifications"}]},
    ).json()["responses"][0]
    assert [n["id"] for n in batch["body"]["value"]] == [created.json()["id"]]


def test_if_match_list_matches_any_tag(client: httpx.Client, app: RegisteredApp) -> None:
    n = client.post("/beta/me/notifications", json=body(app)).json()
    tags = f'W/"41", {n["@odata.etag"]}'
    r = client.patch(
        f"/beta/me/notifications/{n['id']}", json={"readState": "read"}, headers={"If-Match": tags}
    )
    assert r.status_code == 200


def test_replayed_idempotent_answer_keeps_its_etag(
    client: httpx.Client, app: RegisteredApp
) -> None:
    data = body(app)
    first = client.post("/beta/me/notifications", json=data, headers={"Idempotency-Key": "e1"})
    again = client.post("/beta/me/notifications", json=data, headers={"Idempotency-Key": "e1"})
    assert again.headers["etag"] == first.headers["etag"] == first.json()["@odata.etag"]


def test_token_endpoint_refuses_an_impossible_client_id(server: Server) -> None:
    with httpx.Client(base_url=server.base_url) as c:
        form = {"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": "x"}
        r = c.post("/oauth2/v2.0/token", data=form)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
