"""The provider table: every provider and every push platform is registered once, and the
outbound package stays free of the HTTP layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import herald.outbound
from herald.model import DevicePlatform, Provider
from herald.outbound.providers import PROVIDERS
from herald.outbound.providers.table import Table


def test_every_provider_and_push_platform_has_one_entry() -> None:
    """A provider without an entry would have no lane (its deliveries never sent); a platform
    without one would refuse every pushChannel."""
    assert {e.provider for e in PROVIDERS} == set(Provider)
    assert {e.platform for e in PROVIDERS} == set(DevicePlatform) - {DevicePlatform.LIVE}
    assert PROVIDERS.reaching(DevicePlatform.LIVE) is None
    kinds = [e.credentials.kind for e in PROVIDERS]
    assert len(set(kinds)) == len(kinds)  # each stores its credentials under its own name


def test_two_entries_for_one_provider_are_refused() -> None:
    webpush = PROVIDERS[Provider.WEBPUSH]
    with pytest.raises(ValueError, match="share"):
        Table(webpush, webpush)


def test_the_outbound_package_imports_nothing_of_the_http_layer() -> None:
    """Live sessions, the dispatcher and the push engine run without ASGI (a process with no
    HTTP front end could serve them)."""
    root = Path(herald.outbound.__file__).parent
    refused = ("starlette", "uvicorn", "herald.api")
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith(refused)]
    assert found == []
