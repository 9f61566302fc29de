"""Graph conventions that OData tools, the Graph docs and the SDKs rely on, over HTTP against a
running Herald (SQLite and PostgreSQL): JSON batching as msgraph-core writes it, `$`-less query
options, `$metadata`, delta addressed as a function, `Prefer: return=minimal`, the open
notification type and read-only values sent back, and the seed page's `/me/activities`.
The official SDK's own patterns are in tests/test_graph_sdk.py."""

from __future__ import annotations

import base64
import json
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest

from tests.conftest import RegisteredApp, Server
from tests.devices import assert_graph_error, notification_body

FEED = "/beta/me/notifications"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


def new_user() -> str:
    return f"conf-{uuid.uuid4()}"


def client(server: Server, app: RegisteredApp, user: str | None = None) -> httpx.Client:
    return server.client(server.token(app, user or new_user()))


def post(c: httpx.Client, app: RegisteredApp, path: str = FEED, **fields: Any) -> dict[str, Any]:
    r = c.post(path, json=notification_body(app.host_name, **fields))
    assert r.status_code == 201, r.text
    return dict(r.json())


# -- JSON batching as msgraph-core sends it ------------------------------------------------------


def batch(c: httpx.Client, *requests: dict[str, Any]) -> dict[str, dict[str, Any]]:
    r = c.post("/beta/$batch", json={"requests": list(requests)})
    assert r.status_code == 200, r.text
    return {answer["id"]: answer for answer in r.json()["responses"]}


def test_batch_takes_snake_case_depends_on_absolute_urls_and_base64_bodies(
    server: Server, app: RegisteredApp
) -> None:
    c = client(server, app)
    raw = json.dumps(notification_body(app.host_name, groupName="b64")).encode()
    absolute = f"{server.base_url}/beta/me/notifications"
    answers = batch(
        c,
        {
            "id": "1",
            "method": "POST",
            "url": absolute,
            "depends_on": [],
            "headers": {"content-type": "application/json"},
            "body": notification_body(app.host_name, groupName="b64"),
        },
        {
            "id": "2",
            "method": "POST",
            "url": "/me/notifications",
            "depends_on": ["1"],
            "headers": {"content-type": "application/json"},
            "body": base64.b64encode(raw).decode(),
        },
        {
            "id": "3",
            "method": "GET",
            "url": f"{server.base_url}/v1.0/me/notifications?$filter=groupName eq 'b64'"
            "&$count=true",
            "depends_on": ["2"],
            "headers": None,
        },
    )
    assert [answers[i]["status"] for i in "123"] == [201, 201, 200]
    created = {answers[i]["body"]["id"] for i in "12"}
    listing = answers["3"]["body"]
    assert listing["@odata.count"] == 2
    assert {n["id"] for n in listing["value"]} == created
    assert listing["@odata.context"].startswith(f"{server.base_url}/v1.0/$metadata#")


def test_batch_runs_snake_case_dependencies_in_order(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    answers = batch(
        c,
        {"id": "a", "method": "POST", "url": "/me/notifications", "body": {"payload": {}}},
        {"id": "b", "method": "GET", "url": "me/notifications", "depends_on": ["a"]},
    )
    assert answers["a"]["status"] == 400
    assert answers["b"]["status"] == 424  # its dependency failed: not run


@pytest.mark.parametrize(
    "inner",
    [
        {"id": "1", "method": "GET", "url": "http://elsewhere/beta/$batch"},
        {"id": "1", "method": "GET", "url": "http://elsewhere/beta/%24batch"},
        {"id": "1", "method": "GET", "url": "https://h/v2.0/me/notifications"},
        {"id": "1", "method": "GET", "url": "https://h/me/notifications"},
        {"id": "1", "method": "POST", "url": "/me/notifications", "body": "not base64!"},
        {"id": "1", "method": "GET", "url": "/me/notifications", "dependsOn": [], "depends_on": []},
    ],
)
def test_batch_refuses_what_it_cannot_serve(
    server: Server, app: RegisteredApp, inner: dict[str, Any]
) -> None:
    c = client(server, app)
    if inner.get("dependsOn") is not None:
        inner = inner | {"dependsOn": ["0"], "depends_on": ["0"]}
        first = {"id": "0", "method": "GET", "url": "/me/notifications"}
        r = c.post("/beta/$batch", json={"requests": [first, inner]})
    else:
        r = c.post("/beta/$batch", json={"requests": [inner]})
    assert_graph_error(r, 400, "invalidRequest")


# -- query options without `$` -----------------------------------------------------------------


def test_options_without_dollar_are_options(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    ids = [post(c, app, groupName=g)["id"] for g in ("a", "b", "a")]
    r = c.get(f"{FEED}?filter=groupName eq 'a'&count=true&top=1&orderby=createdDateTime asc")
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["@odata.count"] == 2
    assert [n["id"] for n in page["value"]] == [ids[0]]
    # the next link keeps the options and pages with one `$skip`, never two
    nxt = httpx.URL(page["@odata.nextLink"])
    assert [k for k, _ in nxt.params.multi_items()].count("$skip") == 1
    assert "skip" not in nxt.params
    assert [n["id"] for n in c.get(str(nxt)).json()["value"]] == [ids[2]]
    selected = c.get(f"{FEED}?select=groupName&top=1").json()["value"][0]
    assert set(selected) == {"id", "@odata.etag", "groupName"}
    assert c.get(f"{FEED}/$count?filter=groupName eq 'b'").text == "1"


def test_unknown_parameters_are_ignored_but_bad_options_are_not(
    server: Server, app: RegisteredApp
) -> None:
    c = client(server, app)
    post(c, app)
    assert c.get(f"{FEED}?api-version=2&foo=bar").status_code == 200
    for query in ("expand=x", "search=x", "top=many", "top=1&$top=2", "format=json"):
        assert_graph_error(c.get(f"{FEED}?{query}"), 400, "invalidRequest")


# -- $metadata --------------------------------------------------------------------------------


def test_metadata_describes_the_notification_a_get_returns(
    server: Server, app: RegisteredApp
) -> None:
    c = client(server, app)
    n = post(c, app)
    for version in ("beta", "v1.0"):
        r = httpx.get(f"{server.base_url}/{version}/$metadata")  # no token: as Graph
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/xml")
        root = ET.fromstring(r.content)
        schema = root.find(f"*/{EDM}Schema")
        assert schema is not None and schema.get("Namespace") == "microsoft.graph"
        types = {t.get("Name"): t for t in schema.iter(f"{EDM}EntityType")}
        entity = types["notification"]
        assert entity.get("OpenType") == "true"
        key = entity.find(f"{EDM}Key/{EDM}PropertyRef")
        assert key is not None and key.get("Name") == "id"
        properties = {p.get("Name"): p.get("Type") for p in entity.iter(f"{EDM}Property")}
        assert set(properties) == set(n) - {"@odata.context", "@odata.etag"}
        assert properties["payload"] == "microsoft.graph.payloadTypes"
        assert properties["expirationDateTime"] == "Edm.DateTimeOffset"
        complex_types = {t.get("Name") for t in schema.iter(f"{EDM}ComplexType")}
        enums = {t.get("Name") for t in schema.iter(f"{EDM}EnumType")}
        for kind in properties.values():
            assert kind is not None
            name = kind.removeprefix("microsoft.graph.")
            assert kind.startswith("Edm.") or name in complex_types | enums, kind
        functions = {f.get("Name") for f in schema.iter(f"{EDM}Function")}
        assert "delta" in functions
    assert n["@odata.context"].startswith(f"{server.base_url}/beta/$metadata#users(")


# -- delta as a function --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["delta()", "microsoft.graph.delta()"])
def test_delta_as_a_function(server: Server, app: RegisteredApp, name: str) -> None:
    user = new_user()
    c = client(server, app, user)
    first = post(c, app)
    for path in (f"/beta/me/notifications/{name}", f"/beta/users/{user}/notifications/{name}"):
        page = c.get(path).json()
        assert [n["id"] for n in page["value"]] == [first["id"]]
        assert httpx.URL(page["@odata.deltaLink"]).path.endswith(f"/notifications/{name}")
    second = post(c, app)
    changes = c.get(page["@odata.deltaLink"]).json()
    assert [n["id"] for n in changes["value"]] == [second["id"]]


def test_delta_latest_starts_from_now(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    post(c, app)
    for query in ("$deltatoken=latest", "deltatoken=latest"):
        page = c.get(f"{FEED}/delta?{query}").json()
        assert page["value"] == [] and "@odata.nextLink" not in page
    later = post(c, app)
    assert [n["id"] for n in c.get(page["@odata.deltaLink"]).json()["value"]] == [later["id"]]
    # a parameter that is not an OData option is ignored here too; an unsupported option is not
    assert c.get(f"{FEED}/delta?$deltatoken=latest&api-version=2").status_code == 200
    assert_graph_error(c.get(f"{FEED}/delta?filter=x"), 400, "invalidRequest", "filter")


def test_delta_select_shapes_every_page_of_the_round(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    for _ in range(3):
        post(c, app)
    headers = {"Prefer": "odata.maxpagesize=2"}
    page = c.get(f"{FEED}/delta?$select=readState,groupName", headers=headers).json()
    assert all(set(n) == {"id", "@odata.etag", "readState", "groupName"} for n in page["value"])
    page = c.get(page["@odata.nextLink"], headers=headers).json()
    assert [set(n) for n in page["value"]] == [{"id", "@odata.etag", "readState", "groupName"}]
    gone = post(c, app)
    assert c.delete(f"{FEED}/{gone['id']}").status_code == 204
    kept = post(c, app)
    changes = c.get(page["@odata.deltaLink"]).json()["value"]
    assert changes == [
        {"id": gone["id"], "@removed": {"reason": "deleted"}},
        {"id": kept["id"], "@odata.etag": 'W/"1"', "readState": "unread", "groupName": None},
    ]


# -- Prefer: return=minimal --------------------------------------------------------------------


def test_prefer_return_minimal(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    minimal = {"Prefer": "return=minimal"}
    body = notification_body(app.host_name)
    r = c.post(FEED, json=body, headers=minimal)
    assert r.status_code == 204 and r.content == b""
    assert r.headers["preference-applied"] == "return=minimal"
    assert "content-type" not in r.headers
    location = r.headers["location"]
    assert r.headers["etag"] == 'W/"1"'
    replaced = c.post(FEED, json=body, headers={"Prefer": 'odata.maxpagesize=5, return="minimal"'})
    assert replaced.status_code == 204 and replaced.headers["etag"] == 'W/"2"'
    r = c.patch(location, json={"readState": "read"}, headers=minimal)
    assert r.status_code == 204 and r.content == b"" and r.headers["etag"] == 'W/"3"'
    assert c.get(location).json()["readState"] == "read"
    keyed = {"Prefer": "return=minimal", "Idempotency-Key": "k-1"}
    other = notification_body(app.host_name)
    first, repeat = (c.post(FEED, json=other, headers=keyed) for _ in range(2))
    assert first.status_code == repeat.status_code == 204
    assert repeat.headers["location"] == first.headers["location"] != location
    # without the preference, the representation as before
    assert c.patch(location, json={"readState": "unread"}).json()["readState"] == "unread"


# -- the open type, annotations and read-only values --------------------------------------------


def test_unknown_properties_are_kept_and_echoed(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    c = client(server, app, user)
    extra = {"orderRef": "A-17", "amount": {"value": 12.5, "currency": "EUR"}, "tags": [1, "x"]}
    created = post(c, app, **extra, dropped=None)
    assert {k: created[k] for k in extra} == extra and "dropped" not in created
    location = f"{FEED}/{created['id']}"
    assert {k: c.get(location).json()[k] for k in extra} == extra
    listed = c.get(FEED).json()["value"][0]
    assert {k: listed[k] for k in extra} == extra
    assert "orderRef" not in c.get(f"{FEED}?$select=id").json()["value"][0]
    delta = c.get(f"{FEED}/delta").json()["value"][0]
    assert delta["orderRef"] == "A-17"
    # PATCH sets and removes them, one by one
    patched = c.patch(location, json={"orderRef": "A-18", "tags": None, "note": "n"}).json()
    assert patched["orderRef"] == "A-18" and patched["note"] == "n" and "tags" not in patched
    assert patched["amount"] == extra["amount"]
    # a POST that replaces the notification replaces them too
    again = c.post(
        FEED, json=notification_body(app.host_name, appNotificationId=created["appNotificationId"])
    ).json()
    assert again["id"] == created["id"]
    assert not {"orderRef", "amount", "note"} & set(again)


def test_open_properties_cannot_shadow_declared_ones(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    n = post(c, app)
    location = f"{FEED}/{n['id']}"
    for body in ({"ReadState": "read"}, {"PAYLOAD": {}}, {"userActionstate": "dismissed"}):
        assert_graph_error(c.patch(location, json=body), 400, "invalidRequest", next(iter(body)))
    assert_graph_error(c.patch(location, json={"9lives": 1}), 400, "invalidRequest", "9lives")
    assert_graph_error(c.patch(location, json={"big": "x" * 5000}), 413, "requestEntityTooLarge")
    # the cap holds for the merged set, not just for one request
    assert c.patch(location, json={"a": "x" * 2500}).status_code == 200
    assert_graph_error(c.patch(location, json={"b": "x" * 2500}), 413, "requestEntityTooLarge")
    after = c.get(location).json()
    assert after["readState"] == "unread" and after["a"] == "x" * 2500 and "b" not in after


def test_get_modify_patch_round_trip(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    n = post(
        c,
        app,
        targetPolicy={"platformTypes": ["iOS"]},
        fallbackPolicy={
            "endpointFallback": {
                "platformTypes": ["iOS"],
                "fallbackDelayInSeconds": 60,
                "visualContent": {"title": "fallback"},
            }
        },
    )
    location = f"{FEED}/{n['id']}"
    body = c.get(location).json()
    body["groupName"] = "edited"
    body["readState"] = "read"
    body["payload@odata.type"] = "#microsoft.graph.payloadTypes"
    body["targetPolicy"]["@odata.type"] = "#microsoft.graph.targetPolicyEndpoints"
    r = c.patch(location, json=body)
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["groupName"] == "edited" and after["readState"] == "read"
    assert after["@odata.etag"] == 'W/"2"'
    # the same body again: lastModifiedDateTime is now older than the notification's, still fine
    assert c.patch(location, json=body).status_code == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("id", "00000000-0000-0000-0000-000000000000"),
        ("targetHostName", "other.example.com"),
        ("appNotificationId", "other"),
        ("targetPolicy", {"platformTypes": ["windows"]}),
        ("fallbackPolicy", None),
        ("createdDateTime", "2020-01-01T00:00:00Z"),
        ("lastModifiedDateTime", "2999-01-01T00:00:00Z"),
        ("lastModifiedDateTime", "yesterday"),
    ],
)
def test_patch_refuses_changed_read_only_values(
    server: Server, app: RegisteredApp, name: str, value: Any
) -> None:
    c = client(server, app)
    n = post(
        c,
        app,
        targetPolicy={"platformTypes": ["iOS"]},
        fallbackPolicy={
            "endpointFallback": {
                "platformTypes": ["iOS"],
                "fallbackDelayInSeconds": 60,
                "visualContent": {"title": "fallback"},
            }
        },
    )
    location = f"{FEED}/{n['id']}"
    body = c.get(location).json() | {"readState": "read", name: value}
    assert_graph_error(c.patch(location, json=body), 400, "invalidRequest", name)
    unchanged = c.get(location).json()
    assert unchanged["readState"] == "unread" and unchanged["@odata.etag"] == 'W/"1"'


def test_annotations_in_bodies_are_ignored(server: Server, app: RegisteredApp) -> None:
    c = client(server, app)
    body = notification_body(app.host_name) | {
        "@odata.context": "https://graph.microsoft.com/beta/$metadata#users('x')/notifications",
        "@odata.etag": 'W/"99"',
        "groupName@odata.type": "#String",
    }
    body["payload"]["visualContent"]["title@odata.type"] = "#String"
    created = c.post(FEED, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["@odata.etag"] == 'W/"1"'
    assert "groupName@odata.type" not in created.json()


# -- the seed page's example ------------------------------------------------------------------


def test_seed_example_posts_to_activities(server: Server, app: RegisteredApp) -> None:
    user = new_user()
    c = client(server, app, user)
    seed = {
        "targetHostName": app.host_name,
        "appNotificationId": "testDirectToastNotification",
        "payload": {"visualContent": {"title": "Hello Ignite!", "body": "Notifications!"}},
        "targetPolicy": {"platformTypes": ["windows"]},
        "priority": "High",
        "groupName": "TestGroup",
        "displayTimeToLive": "23",
    }
    r = c.post("/beta/me/activities/", json=seed)
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith(f"/beta/users/{user}/notifications/{r.json()['id']}")
    assert r.json()["displayTimeToLive"] == 23
    assert c.get(f"{FEED}/{r.json()['id']}").status_code == 200
    app_only = server.client(server.token(app, None))
    r = app_only.post(f"/beta/users/{user}/activities", json=seed)
    assert r.status_code == 200, r.text  # same appNotificationId: replaced
    assert c.get("/beta/me/activities").status_code == 404  # only the create is aliased
