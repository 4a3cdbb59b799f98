"""The one-way rule: using a model never loads training code, and the package's imports have no cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import vgg
from vgg.checkpoint import ModelInfo, save_model
from vgg.models import build

PACKAGE = Path(vgg.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The vgg modules an ``import``-from statement loads (a name may be a submodule or an attribute)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("vgg"):
        return []
    out = [target]
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        path = PACKAGE.parent / Path(*candidate.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            out.append(candidate)
    return out


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported vgg module: True when imported inside a function}, for every module in the package."""
    graph: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, bool] = {}
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("vgg")]
            else:
                continue
            for target in targets:
                if target != module:
                    edges[target] = edges.get(target, False) or id(node) in nested
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, bool]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_have_no_cycle_even_inside_functions():
    graph = import_graph()
    assert "vgg.predict" in graph and "vgg.training.run" in graph  # the walk really saw the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": False}, "b": {"c": True}, "c": {"a": False}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": False}, "b": {}}) is None


def test_only_the_command_line_reaches_into_training():
    for module, edges in import_graph().items():
        if module.startswith("vgg.training") or module == "vgg.cli":
            continue
        into = [target for target in edges if target.startswith("vgg.training")]
        assert not into, f"{module} imports training code: {into}"


def test_cli_imports_training_only_inside_the_train_command():
    edges = import_graph()["vgg.cli"]
    assert all(lazy for target, lazy in edges.items() if target.startswith("vgg.training"))


def test_loading_a_model_and_predicting_imports_no_training_code(tmp_path: Path, two_class_dir: Path):
    model_file = tmp_path / "model.safetensors"
    save_model(
        model_file,
        build("vgg11", num_classes=2, image_size=32),
        ModelInfo("vgg11", ["cat", "dog"], 32, [0.5] * 3, [0.25] * 3),
    )
    image = next((two_class_dir / "cat").iterdir())
    script = f"""
import json, sys
import vgg
from vgg.checkpoint import ModelInfo, save_model
from vgg.models import build
from vgg.cli import main
classifier = vgg.load({str(model_file)!r}, device="cpu")
prediction = classifier.predict({str(image)!r})
code = main(["predict", {str(model_file)!r}, {str(image)!r}, "--device", "cpu"])
code += main(["evaluate", {str(model_file)!r}, {str(two_class_dir)!r}, "--device", "cpu"])
loaded = sorted(m for m in sys.modules if m.startswith("vgg"))
print(json.dumps({{"label": prediction.label, "code": code, "modules": loaded}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["label"] in ("cat", "dog")
    assert "vgg.predict" in result["modules"] and "vgg.inference" in result["modules"]
    assert [m for m in result["modules"] if m.startswith("vgg.training")] == []
