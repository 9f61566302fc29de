"""`GET /beta/$metadata`: the service's OData CSDL (XML), where every `@odata.context` points.

It describes what Herald serves, in Graph's namespace: the open `notification` entity (with the
properties Graph's own CSDL left out, `appNotificationId` and `fallbackPolicy`, and Herald's
read/action state), its complex and enum types, `notificationSubscription`, the `delta` function
and the `deleteGroup` action, and the `users` entity set and `me` singleton they hang off. The
document is built once, from the same tables the wire code uses, and served without a token, as
Graph serves its own.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald.model import DevicePlatform, Priority, ReadState, UserActionState

NAMESPACE = "microsoft.graph"
EDMX = "http://docs.oasis-open.org/odata/ns/edmx"
EDM = "http://docs.oasis-open.org/odata/ns/edm"

# (name, type, nullable) of each property; `#x` is a type of this namespace.
NOTIFICATION = (
    ("id", "Edm.String", False),
    ("targetHostName", "Edm.String", False),
    ("appNotificationId", "Edm.String", False),
    ("groupName", "Edm.String", True),
    ("payload", "#payloadTypes", False),
    ("targetPolicy", "#targetPolicyEndpoints", False),
    ("priority", "#priority", False),
    ("displayTimeToLive", "Edm.Int32", True),
    ("expirationDateTime", "Edm.DateTimeOffset", False),
    ("fallbackPolicy", "#fallbackPolicy", True),
    ("createdDateTime", "Edm.DateTimeOffset", False),
    ("lastModifiedDateTime", "Edm.DateTimeOffset", False),
    ("readState", "#readState", False),
    ("userActionState", "#userActionState", False),
)
COMPLEX = {
    "payloadTypes": (
        ("rawContent", "Edm.String", True),
        ("visualContent", "#visualProperties", True),
    ),
    "visualProperties": (("title", "Edm.String", False), ("body", "Edm.String", True)),
    "targetPolicyEndpoints": (("platformTypes", "Collection(Edm.String)", False),),
    "fallbackPolicy": (("endpointFallback", "#fallbackPolicyProperties", False),),
    "fallbackPolicyProperties": (
        ("platformTypes", "Collection(Edm.String)", False),
        ("fallbackDelayInSeconds", "Edm.Int32", False),
        ("visualContent", "#visualProperties", False),
    ),
}
SUBSCRIPTION = (
    ("id", "Edm.String", False),
    ("application", "Edm.String", False),
    ("platform", "#devicePlatform", False),
    ("displayName", "Edm.String", True),
    ("pushChannel", "Edm.Untyped", True),
    ("expirationDateTime", "Edm.DateTimeOffset", False),
    ("createdDateTime", "Edm.DateTimeOffset", False),
    ("lastModifiedDateTime", "Edm.DateTimeOffset", False),
    ("deliveryState", "Edm.Untyped", False),
)
ENUMS = {
    "priority": [p.value for p in Priority],
    "readState": [r.value for r in ReadState],
    "userActionState": [a.value for a in UserActionState],
    "devicePlatform": [d.value for d in DevicePlatform],
}


def _edm(parent: ET.Element, tag: str, attrs: dict[str, str] | None = None) -> ET.Element:
    """A child element in the CSDL (edm) namespace."""
    return ET.SubElement(parent, f"{{{EDM}}}{tag}", attrs or {})


def _type(name: str) -> str:
    if name.startswith("Collection(#"):
        return f"Collection({NAMESPACE}.{name[12:]}"
    return f"{NAMESPACE}.{name[1:]}" if name.startswith("#") else name


def _properties(parent: ET.Element, properties: tuple[tuple[str, str, bool], ...]) -> None:
    for name, kind, nullable in properties:
        attrs = {"Name": name, "Type": _type(kind)}
        if not nullable:
            attrs["Nullable"] = "false"
        _edm(parent, "Property", attrs)


def _entity(
    schema: ET.Element, name: str, properties: tuple[tuple[str, str, bool], ...], open_type: bool
) -> ET.Element:
    attrs = {"Name": name, "OpenType": "true"} if open_type else {"Name": name}
    entity = _edm(schema, "EntityType", attrs)
    key = _edm(entity, "Key")
    _edm(key, "PropertyRef", {"Name": "id"})
    _properties(entity, properties)
    return entity


def _operations(schema: ET.Element) -> None:
    notifications = f"Collection({NAMESPACE}.notification)"
    delta = _edm(schema, "Function", {"Name": "delta", "IsBound": "true"})
    _edm(delta, "Parameter", {"Name": "bindingParameter", "Type": notifications})
    _edm(delta, "ReturnType", {"Type": notifications})
    group = _edm(schema, "Action", {"Name": "deleteGroup", "IsBound": "true"})
    _edm(group, "Parameter", {"Name": "bindingParameter", "Type": notifications})
    _edm(group, "Parameter", {"Name": "groupName", "Type": "Edm.String"})
    _edm(group, "ReturnType", {"Type": "Edm.Untyped"})


def _user(schema: ET.Element) -> None:
    user = _entity(schema, "user", (("id", "Edm.String", False),), open_type=False)
    for name, kind in (
        ("notifications", "notification"),
        ("notificationSubscriptions", "notificationSubscription"),
    ):
        _edm(
            user,
            "NavigationProperty",
            {"Name": name, "Type": f"Collection({NAMESPACE}.{kind})", "ContainsTarget": "true"},
        )
    container = _edm(schema, "EntityContainer", {"Name": "GraphService"})
    _edm(container, "EntitySet", {"Name": "users", "EntityType": f"{NAMESPACE}.user"})
    _edm(container, "Singleton", {"Name": "me", "Type": f"{NAMESPACE}.user"})


@functools.cache
def document() -> bytes:
    """The CSDL XML document (OData 4.0 EDMX)."""
    ET.register_namespace("edmx", EDMX)
    ET.register_namespace("", EDM)  # CSDL elements unprefixed, as OData services write them
    root = ET.Element(f"{{{EDMX}}}Edmx", {"Version": "4.0"})
    services = ET.SubElement(root, f"{{{EDMX}}}DataServices")
    schema = _edm(services, "Schema", {"Namespace": NAMESPACE})
    for name, members in ENUMS.items():
        enum = _edm(schema, "EnumType", {"Name": name})
        for value, member in enumerate(members):
            _edm(enum, "Member", {"Name": member, "Value": str(value)})
    for name, properties in COMPLEX.items():
        _properties(_edm(schema, "ComplexType", {"Name": name}), properties)
    _entity(schema, "notification", NOTIFICATION, open_type=True)
    _entity(schema, "notificationSubscription", SUBSCRIPTION, open_type=False)
    _operations(schema)
    _user(schema)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


async def metadata(request: Request) -> Response:
    return Response(document(), media_type="application/xml")


def routes() -> list[BaseRoute]:
    return [Route("/$metadata", metadata, methods=["GET"])]
