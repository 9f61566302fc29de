"""A client of a stand-in's HTTP control API (`<url>/_control/...`), for tests and benchmarks
that run the stand-in in another process (`python -m tests.standins`)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx


class ControlClient:
    """The same calls as on a StandIn object, over HTTP. Close it (or use `with`)."""

    def __init__(self, url: str, ca_file: Path | str, timeout: float = 30.0) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=f"{self.url}/_control/", verify=context, timeout=timeout, trust_env=False
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _get(self, name: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        response = self._client.get(name, params=query)
        response.raise_for_status()
        return response.json()

    def _post(self, name: str, body: Mapping[str, Any], timeout: float | None = None) -> Any:
        response = self._client.post(
            name,
            content=json.dumps(dict(body)),
            timeout=self._client.timeout if timeout is None else timeout,
        )
        if response.status_code == 504 and name == "wait":
            raise TimeoutError(response.json()["error"])
        response.raise_for_status()
        return response.json()

    def info(self) -> dict[str, Any]:
        return dict(self._get("info"))

    def stats(self) -> dict[str, int]:
        return dict(self._get("stats"))

    def accepted(
        self, target: str | None = None, *, kind: str | None = None, since: int = 0
    ) -> list[dict[str, Any]]:
        """Deliveries as JSON (Delivery.to_json()); `since`: only those with a larger seq."""
        return list(self._get("accepted", target=target, kind=kind, since=since))

    def refused(self, target: str | None = None, *, on: str | None = None) -> list[dict[str, Any]]:
        return list(self._get("refused", target=target, on=on))

    def wait_accepted(
        self,
        count: int,
        timeout: float = 10.0,
        *,
        target: str | None = None,
        kind: str | None = None,
    ) -> dict[str, int]:
        """Wait until `count` were accepted; the stats then. TimeoutError otherwise."""
        body = {"count": count, "timeout": timeout, "target": target, "kind": kind}
        return dict(self._post("wait", body, timeout=timeout + 10))

    def fault(
        self,
        status: int,
        count: int | None = 1,
        *,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
        target: str | None = None,
        on: str = "send",
    ) -> None:
        body = {
            "status": status,
            "count": count,
            "headers": dict(headers or {}),
            "reason": reason,
            "target": target,
            "on": on,
        }
        self._post("fault", body)

    def delay(
        self,
        seconds: float,
        *,
        target: str | None = None,
        on: str = "send",
        count: int | None = None,
    ) -> None:
        self._post("delay", {"seconds": seconds, "target": target, "on": on, "count": count})

    def gone(self, target: str, status: int | None = None) -> None:
        self._post("gone", {"target": target, "status": status})

    def revive(self, target: str) -> None:
        self._post("revive", {"target": target})

    def clear_faults(self) -> None:
        self._post("clear-faults", {})

    def reset(self) -> None:
        self._post("reset", {})

    def create(self, count: int = 1, **options: Any) -> list[Any]:
        """New targets: Web Push subscriptions (option applicationServerKey), APNs device tokens
        (topic), FCM registration tokens (project_id) or WNS channel URIs (client_id)."""
        return list(self._post("new", {"count": count, **options})["items"])

    def call(self, name: str, body: Mapping[str, Any] | None = None) -> Any:
        """A provider-specific call: "expire-provider-tokens" (APNs), "expire-tokens" (FCM,
        WNS)."""
        return self._post(name, body or {})
