"""The package's layers import only the layers below them (docs/architecture.md):
utilities -> data -> augment -> models -> losses -> methods -> evaluate -> train -> commands.

Every ``import`` counts, also those inside functions (the lazy ones that keep start-up fast):
a lazy import upwards is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfsup"
# lowest first; a module may import its own layer and those before it
LAYERS: list[set[str]] = [
    {"errors", "progress", "precision", "checks"},
    {"data"},
    {"augment"},
    {"models"},
    {"losses"},
    {"methods"},
    {"evaluate"},
    {"train"},
    {"run", "export"},  # the Python API's pretrain / load_encoder and export
    {"commands", "ablate", "cli", "__init__", "__main__"},
]
RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}
PACKAGE_ATTRIBUTES = {"__version__"}  # `from selfsup import __version__`: no module


def _imported_parts(tree: ast.AST) -> set[str]:
    """The top-level parts of selfsup (``data``, ``train``, ...) that ``tree`` imports."""
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = node.module.split(".")
            if names[0] != "selfsup":
                continue
            if len(names) > 1:
                parts.add(names[1])
            else:  # from selfsup import x: a module, or an attribute of the package
                parts |= {a.name for a in node.names} - PACKAGE_ATTRIBUTES
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError("relative imports are not used in selfsup")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "selfsup" and len(names) > 1:
                    parts.add(names[1])
    return parts


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_module_of_selfsup_has_a_layer():
    parts = {_part(path) for path in PACKAGE.rglob("*.py")}
    assert parts <= set(RANK), f"add to LAYERS: {sorted(parts - set(RANK))}"


def test_each_layer_imports_only_the_layers_below_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(path)
        for part in _imported_parts(ast.parse(path.read_text(), str(path))):
            if part == "selfsup":  # `import selfsup` (trainer: selfsup.__version__)
                continue
            assert part in RANK, f"{path}: imports selfsup.{part}, which has no layer"
            if RANK[part] > RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports selfsup.{part}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_sees_lazy_and_package_imports():
    """The checker itself: an import inside a function, and `from selfsup import x`, count."""
    tree = ast.parse(
        "def f():\n    from selfsup.train import trainer\n"
        "from selfsup import commands, __version__\nimport selfsup.data.cache\n"
    )
    assert _imported_parts(tree) == {"train", "commands", "data"}
