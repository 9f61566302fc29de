"""The layers of `src/herald` and which may import which (docs/architecture.md, "Layers"), and no
import cycles.

Read from the source, not by importing it: every `import` statement of a module counts, wherever
it stands (at the top, inside a function, under `if TYPE_CHECKING:`). A type-only import is still
a dependency of the design, and a lazy import only hides one; so neither is a way around a layer.
`from a.b import c` depends on `a.b`, and on `a.b.c` too when that is a module.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Lowest first. Each layer: the modules in it (a name and everything below it), and the layers
# it may import besides its own.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base": (
        (
            "herald",
            "herald.errors",
            "herald.model",
            "herald.preferences",
            "herald.fields",
            "herald.query",
            "herald.settings",
            "herald.users",
            "herald.limits",
            "herald.logs",
            "herald.metrics",
        ),
        (),
    ),
    "store": (("herald.store",), ("base",)),
    "broker": (("herald.broker",), ("base", "store")),
    "auth": (("herald.auth",), ("base",)),
    "domain": (
        ("herald.feed", "herald.access", "herald.expiry", "herald.appfeed"),
        ("base", "store", "auth"),
    ),
    "outbound": (("herald.outbound", "herald.sends"), ("base", "store", "broker", "domain")),
    "service": (
        ("herald.service", "herald.collector"),
        ("base", "store", "broker", "auth", "domain", "outbound"),
    ),
    "api": (
        ("herald.api",),
        ("base", "store", "broker", "auth", "domain", "outbound", "service"),
    ),
    "process": (
        (
            "herald.__main__",
            "herald.cli",
            "herald.server",
            "herald.connections",
            "herald.supervisor",
            "herald.websocket",
        ),
        ("base", "store", "broker", "auth", "domain", "outbound", "service", "api"),
    ),
}


def modules(src: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((src / "herald").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(src: Path) -> dict[str, set[str]]:
    """Each module of herald -> the modules of herald it imports."""
    mods = modules(src)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def layer_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for layer, (prefixes, _) in LAYERS.items():
        for prefix in prefixes:
            inside = module == prefix or (prefix != "herald" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return best[1] if best else None


def test_every_module_has_a_layer() -> None:
    assert [m for m in modules(SRC) if layer_of(m) is None] == []


def test_no_module_imports_a_layer_above_it() -> None:
    wrong = []
    for module, targets in sorted(imports(SRC).items()):
        layer = layer_of(module)
        assert layer is not None
        allowed = {layer, *LAYERS[layer][1]}
        for target in sorted(targets):
            if layer_of(target) not in allowed:
                wrong.append(f"{module} ({layer}) imports {target} ({layer_of(target)})")
    assert wrong == []


def test_no_import_cycles() -> None:
    try:
        tuple(graphlib.TopologicalSorter(imports(SRC)).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_layers_are_ordered() -> None:
    """A layer may import only layers listed before it: the table is itself acyclic."""
    order = list(LAYERS)
    for layer, (_, below) in LAYERS.items():
        assert all(order.index(b) < order.index(layer) for b in below), layer


# Who may hold the whole store (`Store`, the union of the store's Protocols): the composition
# root, which opens and closes it, and create_app, which takes one from tests. Every other
# consumer is typed by the narrow Protocol it needs (`herald.store.contract`; mypy holds each
# to it).
WHOLE_STORE = {"herald.service", "herald.api.app"}


def test_only_the_composition_root_holds_the_whole_store() -> None:
    holders = set()
    for module, path in modules(SRC).items():
        if module == "herald.store" or module.startswith("herald.store."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module in ("herald.store", "herald.store.contract")
                and any(alias.name == "Store" for alias in node.names)
            ):
                holders.add(module)
    assert holders <= WHOLE_STORE


def test_the_documented_layers_are_these() -> None:
    """docs/architecture.md's table of layers says what LAYERS says (names, order, may import)."""
    doc = (SRC.parent / "docs" / "architecture.md").read_text()
    table = doc.split("## Layers", 1)[1].split("\n\n| layer |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    documented = {}
    for name, _, below in rows:
        everything = below.strip() == "all of the above"
        allowed = list(documented) if everything else below.replace("—", "").split(",")
        documented[name.strip()] = tuple(b.strip() for b in allowed if b.strip())
    assert documented == {layer: below for layer, (_, below) in LAYERS.items()}
