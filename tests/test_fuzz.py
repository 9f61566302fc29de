"""Random malformed requests (fixed seed): whatever arrives, Herald answers with a Graph error or
a success, never a 500, on both stores."""

from __future__ import annotations

import random
import uuid
from typing import Any

import httpx

from tests.conftest import RegisteredApp, Server

FIELDS = [
    "targetHostName",
    "appNotificationId",
    "groupName",
    "payload",
    "targetPolicy",
    "priority",
    "displayTimeToLive",
    "expirationDateTime",
    "fallbackPolicy",
    "readState",
    "userActionState",
]
QUERY = ["$filter", "$top", "$skip", "$orderby", "$select", "$count", "$expand", "$FILTER"]


def value(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [
        None,
        True,
        rng.randint(-(2**70), 2**70),
        rng.random() * 1e300,
        "",
        "x" * rng.randint(0, 300),
        "\u0000\u00b2\ud7ff\u202e",
        "2026-13-45T99:99:99Z",
        "9999-12-31T23:59:59-14:00",
        "iOS",
        "HIGH",
        "2",
    ]
    if depth < 3:
        choices += [
            [value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
            {rng.choice(FIELDS + ["visualContent", "title", "rawContent"]): value(rng, depth + 1)},
        ]
    return rng.choice(choices)


def body(rng: random.Random, host: str) -> Any:
    data: dict[str, Any] = {"targetHostName": host, "payload": {"rawContent": "x"}}
    for _ in range(rng.randint(1, 4)):
        data[rng.choice(FIELDS)] = value(rng)
    return data if rng.random() > 0.1 else value(rng)


def query(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        text = rng.choice(
            [
                "groupName eq 'a'",
                "readState eq",
                "createdDateTime gt 2026-01-01T00:00:00Z",
                "(((",
                "not not not id eq null",
                "priority lt 'High'",
                "-1",
                "99999999999999999999",
                "*",
                "id in ('a','b')",
                "payload/rawContent",
                "groupName desc, id",
                "true",
                "\u0000",
            ]
        )
        parts.append((rng.choice(QUERY), text))
    return str(httpx.QueryParams(parts))


def test_no_input_makes_a_500(server: Server, app: RegisteredApp) -> None:
    rng = random.Random(4711)
    user = f"fuzz-{uuid.uuid4()}"
    with server.client(server.token(app, user)) as c:
        valid = {"targetHostName": app.host_name, "payload": {"rawContent": "x"}}
        target = c.post("/beta/me/notifications", json=valid).json()
        item = f"/beta/me/notifications/{target['id']}"
        for _ in range(250):
            post = c.post("/beta/me/notifications", json=body(rng, app.host_name))
            patch = c.patch(item, json=body(rng, app.host_name))
            listed = c.get(f"/beta/me/notifications?{query(rng)}")
            counted = c.get(f"/beta/me/notifications/$count?{query(rng)}")
            for r in (post, patch, listed, counted):
                assert r.status_code < 500, (r.request.method, r.request.url, r.text)
                if r.status_code >= 400:
                    assert r.json()["error"]["code"]
