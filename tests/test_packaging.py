"""What the wheel ships: the plugin and its tools, nothing made for tests, no dependency they do not import.

The wheel is built from this checkout as `pip install .` builds it (the image does exactly that), and
its file list and Requires-Dist are read back from the archive.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.test_architecture import imported_modules

SRC = ROOT / "src" / "p11kms"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the dev environment has setuptools, and CI must not depend on fetching it twice.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, timeout=300, capture_output=True)
    (path,) = out.glob("p11kms-*.whl")
    return zipfile.ZipFile(path)


def _requires(wheel: zipfile.ZipFile) -> set[str]:
    """The distribution names of the wheel's unconditional Requires-Dist (extras left out), normalised."""
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    message = email.parser.Parser().parsestr(wheel.read(metadata).decode())
    names = set()
    for requirement in message.get_all("Requires-Dist") or []:
        if "extra ==" not in requirement:
            names.add(_normalise(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]))
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports(src: Path) -> dict[str, set[str]]:
    """Top-level module -> the modules under ``src`` importing it, for every module outside the stdlib and p11kms."""
    found: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        for _, name in imported_modules(path):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in {"p11kms", "__future__"}:
                found.setdefault(top, set()).add(str(path.relative_to(src)))
    return found


def test_the_wheel_ships_no_test_tooling(wheel: zipfile.ZipFile) -> None:
    packages = {name.split("/")[1] for name in wheel.namelist() if name.startswith("p11kms/") and name.count("/") > 1}
    assert "standin" not in packages, "the kube-apiserver stand-in is a test tool: it lives in tests/"
    assert packages == {"hsm", "kmsv2", "kube", "ops", "plugin"}


def test_cryptography_is_not_a_runtime_dependency(wheel: zipfile.ZipFile) -> None:
    """The plugin does all cryptography in the HSM; only the stand-in and the test PKI need a software one."""
    assert "cryptography" not in _requires(wheel)
    assert "cryptography" not in _third_party_imports(SRC)


def test_every_third_party_import_is_a_declared_dependency(wheel: zipfile.ZipFile) -> None:
    """Removing a dependency must not leave an import of it behind (in a module of the wheel, lazily or not)."""
    distributions = importlib.metadata.packages_distributions()
    required = _requires(wheel)
    undeclared = {
        module: sorted(users) for module, users in _third_party_imports(SRC).items()
        if not {_normalise(d) for d in distributions.get(module, [module])} & required
    }
    assert undeclared == {}


def test_an_undeclared_import_is_reported(tmp_path: Path) -> None:
    (tmp_path / "tool.py").write_text("def f() -> None:\n    from cryptography import x509\n")
    assert _third_party_imports(tmp_path) == {"cryptography": {"tool.py"}}
