"""The direction of imports (ARCHITECTURE): model never imports service; the engine imports no web framework or
metrics library; only the runner touches the model; only metrics.py imports prometheus_client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Top-level module names and full dotted names imported by a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names | {n.split(".")[0] for n in names}


# The engine's device side: the runner and what it drives (input buffers, sampler, CUDA graphs, dtype choice,
# the served form of the weights).
DEVICE_SIDE = {"runner.py", "inputs.py", "sampler.py", "cuda_graphs.py", "device.py", "weights.py"}


def test_the_host_side_of_the_engine_imports_no_torch() -> None:
    for name in ("scheduler.py", "blocks.py", "request.py", "detokenizer.py"):
        names = imports(ROOT / "service/engine" / name)
        assert "torch" not in names and "model" not in names, name


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_never_imports_service(path: Path) -> None:
    bad = {n for n in imports(path) if n in ("service", "fastapi", "starlette", "uvicorn", "prometheus_client")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", files("service/engine"), ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_imports_no_web_framework_and_only_runner_imports_model(path: Path) -> None:
    names = imports(path)
    bad = names & {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "httpx"}
    assert not bad, f"{path.name} imports {bad}"
    if path.name not in DEVICE_SIDE:
        assert "model" not in names, f"{path.name} imports the model package; only {sorted(DEVICE_SIDE)} may"


def test_scheduler_is_pure_python() -> None:
    names = imports(ROOT / "service/engine/scheduler.py")
    assert "torch" not in names and "numpy" not in names


def test_only_metrics_imports_prometheus() -> None:
    users = [p.name for p in files("service") if "prometheus_client" in imports(p)]
    assert users == ["metrics.py"], users


@pytest.mark.parametrize("path", files("service/routes"), ids=lambda p: str(p.relative_to(ROOT)))
def test_routes_do_not_touch_the_model(path: Path) -> None:
    names = imports(path)
    assert "torch" not in names and "model" not in names, f"{path.name} should only translate HTTP <-> engine"


@pytest.mark.parametrize("path", files("service/routes"), ids=lambda p: str(p.relative_to(ROOT)))
def test_routes_reach_the_model_only_through_the_engine(path: Path) -> None:
    """No route holds the network: no `.runner`, no `served.model` (the model runs on the engine's thread)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and (
        node.attr == "runner" or (node.attr == "model" and isinstance(node.value, ast.Name) and node.value.id == "served")
        or (node.attr == "model" and isinstance(node.value, ast.Attribute) and node.value.attr == "checkpoint"))]
    assert not bad, f"{path.name} touches the model directly at lines {bad}"



def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when the file is imported: its module-level statements only (an import inside a function
    runs later, on purpose, and is no circle at import time)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_import_circle() -> None:
    paths = files("model") + files("service")
    known = {module_of(p) for p in paths}
    graph = {module_of(p): {n for n in top_level_imports(p) if n in known} - {module_of(p)} for p in paths}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("path", files("service/serving"), ids=lambda p: str(p.relative_to(ROOT)))
def test_serving_knows_no_http_framework_and_no_route(path: Path) -> None:
    """The serving layer sits under the routes: it never imports them, nor the web framework they translate."""
    names = imports(path)
    assert not names & {"fastapi", "starlette", "uvicorn"}, path.name
    assert not any(n.startswith("service.routes") for n in names), path.name


@pytest.mark.parametrize("name", ["openai", "chat", "generate", "attention"])
def test_a_generation_route_parses_makes_one_call_and_renders(name: str) -> None:
    """Each POST handler of these routes calls one thing of the route helpers (deps.serve, into the serving
    layer) and touches no engine: the request body passes the route modules once."""
    tree = ast.parse((ROOT / "service/routes" / f"{name}.py").read_text())
    helpers = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
               and node.module == "service.routes.deps" for a in node.names}
    handlers = [node for node in tree.body if isinstance(node, ast.AsyncFunctionDef)
                and any("post" in ast.unparse(d) for d in node.decorator_list)]
    assert handlers
    for handler in handlers:
        calls = [ast.unparse(c.func) for c in ast.walk(handler) if isinstance(c, ast.Call)]
        assert [c for c in calls if c in helpers] == ["serve"], (handler.name, calls)
        assert not any("engine" in c or "open" in c for c in calls), (handler.name, calls)
