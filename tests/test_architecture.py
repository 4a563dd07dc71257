"""The package's shape, read from its source: no import circles, methods import only their base, data never
imports methods, modules and functions stay small, and validating a spec imports no torch."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "methods")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70
# The epoch loop reads top to bottom in one function (STYLE.md point 6).
LONG_FUNCTIONS_ALLOWED = {"orchestrator.worker.run_trial"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports, at module level or inside functions (a lazy import is still an edge)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: c may be a module of a.b, else a name defined in a.b
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_circle_in_the_packages():
    graph = import_graph()
    assert len(graph) > 40  # the walk really found the modules
    assert find_cycle(graph) is None


def test_method_files_import_only_their_base():
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith("methods.") and name not in ("methods.base", "methods.catalog"):
            assert imports <= {"methods.base"}, f"{name} imports {sorted(imports - {'methods.base'})}"


def test_data_never_imports_methods():
    for name, imports in import_graph().items():
        if name == "orchestrator.data" or name.startswith("orchestrator.data."):
            assert not {m for m in imports if m.split(".")[0] == "methods"}, name


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in project_modules().items():
        source = path.read_text("utf-8")
        lines = source.count("\n")
        if name.startswith("orchestrator") and lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


@pytest.mark.parametrize("constant", ["IGNORE_INDEX", "REFERENCE_METHODS", "PROJECT_ROOT", "FQ_FLOOR",
                                      "DIVERGED_SCORE"])
def test_shared_constants_are_defined_once(constant):
    homes = []
    for name, path in project_modules().items():
        for node in ast.parse(path.read_text("utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == constant for t in targets):
                homes.append(name)
    assert len(homes) == 1, homes


def test_validating_a_spec_imports_no_torch(tmp_path):
    """`unlearn validate` on a valid and on a bad spec, in a fresh interpreter: neither imports torch,
    transformers or ray (what made a bad-input exit take seconds)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  methods: [{name: npo, params: {betta: 1}}]\n")
    script = (
        "import json, sys\n"
        "from orchestrator import cli\n"
        f"codes = [cli.main(['validate', {str(ROOT / 'jobs' / 'quickstart.yaml')!r}]), cli.main(['validate', {str(bad)!r}]),"
        " cli.main(['methods'])]\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'pyarrow') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 2, 0]
    assert "betta" in out.stderr
    assert result["heavy"] == []
