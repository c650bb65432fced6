"""The package layers: each package imports only the ones below it, counting imports inside functions.

``sdxl`` (models, pipeline, data) is the ground floor; ``testbed`` (the generated scenes, the testbed's
training, checker and scorer) uses only it; ``quant`` (numerics, the encodings format)
sits on it; ``backends`` on both; ``calibration`` drives a backend; ``accuracy`` reads images; the
``harness`` (LoadGen application) is on top. A test over the source's ``ast``, so an import added in a
function body, or an ``importlib.import_module("pkg.mod")`` string, counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: bottom to top: a package may import itself and the packages before it
LAYERS = ("sdxl", "testbed", "quant", "backends", "calibration", "accuracy", "harness")


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved, import_module strings too)."""
    module_parts = path.relative_to(ROOT).with_suffix("").parts
    package_parts = module_parts if path.name == "__init__.py" else module_parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[:len(package_parts) - node.level + 1])
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _package_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the files that make that edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _imported_modules(path, package):
                target = name.split(".")[0]
                if target in LAYERS and target != package:
                    edges.setdefault((package, target), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_package_imports_only_the_layers_below_it():
    upward = {f"{a} -> {b}": files for (a, b), files in _package_edges().items() if LAYERS.index(b) > LAYERS.index(a)}
    assert not upward, f"imports that reach up a layer: {upward}"


def test_the_ground_floor_imports_no_other_package():
    assert not [edge for edge in _package_edges() if edge[0] == "sdxl"]


def test_the_walker_sees_imports_inside_functions(tmp_path):
    """The graph counts what a function imports, so a lazy import cannot hide an upward edge."""
    source = tmp_path / "sdxl" / "probe.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from harness.cli import main\n    from .models import ModelSpec\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _imported_modules(source, "sdxl") == {"harness.cli", "sdxl.models"}
    finally:
        ROOT = saved
