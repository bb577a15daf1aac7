"""The package's import layering (docs/architecture.md): no cycles, and no module imports a layer
above its own. Read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"

# Bottom to top. A module may import its own layer and the ones below. `service` itself holds only
# the version. `service.engine` itself
# (the Engine protocol, SamplingParams) and `service.engine.config` (EngineConfig, EngineStats)
# are leaves every layer may use; the
# engine's implementation sits above the adapter packages it reads.
LAYERS: list[tuple[str, ...]] = [
    (
        "service",
        "service.errors",
        "service.engine",
        "service.engine.config",
        "service.fingerprint",
        "service.names",
        "service.request_id",
        "service.settings",
        "service.tenants",
    ),
    ("service.metrics",),
    ("service.adapters", "service.base_model", "service.grammar"),
    ("service.engine.",),
    ("service.guardrails",),
    ("service.runtime",),
    (
        "service.protocol",
        "service.protocol_objects",
        "service.protocol_responses",
        "service.protocol_vllm",
        "service.serving",
    ),
    ("service.auth", "service.routes"),
    ("service.app", "service.__main__"),
]
TRAINING = Path(__file__).resolve().parents[1] / "training"


def modules(package: Path) -> dict[str, Path]:
    root = package.parent
    found = {}
    for path in package.rglob("*.py"):
        found[".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `name` imports (absolute and relative imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def layer(name: str) -> int:
    """The layer of the longest entry of LAYERS that is `name` or a package holding it
    ("service.engine." holds the engine's modules but not `service.engine` itself)."""
    best, level = "", None
    for index, members in enumerate(LAYERS):
        for member in members:
            package = member if member.endswith(".") else member + "."
            if (name == member or name.startswith(package)) and len(member) > len(best):
                best, level = member, index
    assert level is not None, f"{name} is in no layer: add it to LAYERS and docs/architecture.md"
    return level


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_service_imports_have_no_cycle_and_never_point_up():
    known = modules(SERVICE)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []
    upward = sorted((a, b) for a, deps in graph.items() for b in deps if layer(b) > layer(a))
    assert upward == []
    # the engine never sees HTTP, wire schemas, serving or guardrails
    engine = {n for n in known if n.startswith("service.engine")}
    above = {n for n in known if layer(n) >= layer("service.guardrails")}
    assert not {b for a in engine for b in graph[a]} & above


def test_the_checker_sees_an_upward_arrow_and_a_cycle():
    assert layer("service.engine") < layer("service.adapters.manifest") < layer("service.engine.batched")
    assert layer("service.serving.chat") > layer("service.runtime")
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_training_never_imports_serving():
    serving = {n for n in modules(SERVICE) if layer(n) >= layer("service.protocol")}
    known = {**modules(SERVICE), **modules(TRAINING)}
    for name, path in modules(TRAINING).items():
        assert not imports(name, path, known) & serving, name
