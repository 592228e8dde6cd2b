"""The package layering: imports go one way only (docs/architecture.md).

cli -> ops -> plugin | kube -> config | hsm | observability | kmsv2. A module may import its own
package and anything below its layer, never a layer above, and ``plugin`` and ``kube`` never import
each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "p11kms"

# The packages each package may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "cli": {"ops", "plugin", "kube", "config", "hsm", "observability", "kmsv2"},
    "__main__": {"cli"},
    "ops": {"plugin", "kube", "config", "hsm", "observability", "kmsv2"},
    "plugin": {"config", "hsm", "observability", "kmsv2"},
    "kube": {"config", "hsm", "observability", "kmsv2"},
    "config": set(),
    "observability": set(),
    "hsm": set(),
    "kmsv2": set(),
    "__init__": set(),
}


def _package_of(path: Path, src: Path = SRC) -> str:
    relative = path.relative_to(src)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_modules(path: Path) -> set[tuple[int, str]]:
    """(line, dotted module name) for every absolute import in the file, lazy ones inside functions included;
    ``from p11kms import x`` counts as ``p11kms.x``."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "p11kms" else [f"p11kms.{a.name}" for a in node.names]
            found.update((node.lineno, name) for name in names)
    return found


def _imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, first component below p11kms) for every p11kms import in the file."""
    return {(line, name.split(".")[1]) for line, name in imported_modules(path) if name.startswith("p11kms.")}


def layering_violations(src: Path = SRC) -> list[str]:
    violations = []
    for path in sorted(src.rglob("*.py")):
        package = _package_of(path, src)
        for line, target in sorted(_imported_packages(path)):
            if target != package and target not in ALLOWED[package]:
                violations.append(f"{path.relative_to(src)}:{line}: {package} imports {target}")
    return violations


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {_package_of(path) for path in SRC.rglob("*.py")}
    assert packages <= set(ALLOWED), f"new package(s) need a layer in ALLOWED: {packages - set(ALLOWED)}"


def test_imports_go_one_way_only() -> None:
    assert layering_violations() == []


@pytest.mark.parametrize(("module", "statement"), [
    ("plugin/extra.py", "from p11kms.ops.doctor import run_doctor\n"),
    ("kube/extra.py", "import p11kms.plugin.service\n"),
    ("hsm/extra.py", "from p11kms import config\n"),
])
def test_an_upward_import_is_reported(tmp_path: Path, module: str, statement: str) -> None:
    target = tmp_path / module
    target.parent.mkdir(parents=True)
    target.write_text(statement)
    assert len(layering_violations(tmp_path)) == 1
