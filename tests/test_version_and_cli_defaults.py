"""One version everywhere, --help that shows defaults, a dev directory that does not follow the cwd,
and a config saved with a byte-order mark."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import p11kms
from p11kms.cli import build_parser
from p11kms.config import load_config
from p11kms.plugin.metrics import Metrics


def test_version_has_one_source_of_truth() -> None:
    result = subprocess.run([sys.executable, "-m", "p11kms", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"p11kms {p11kms.__version__} (python ")
    assert metadata.version("p11kms") == p11kms.__version__  # pyproject.toml reads p11kms.__version__
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "p11kms.__version__"}' in pyproject


def test_build_info_metric_carries_the_version() -> None:
    text = Metrics().exposition().decode()
    assert f'p11kms_build_info{{grpcio="{metadata.version("grpcio")}",python="' in text
    assert f'version="{p11kms.__version__}"}} 1.0' in text


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _subparsers(sub)
    return found


def test_help_shows_every_default() -> None:
    missing = []
    for parser in _subparsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and "%(default)" not in (action.help or ""):
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, f"--help does not show these defaults: {missing}"


def test_the_dev_directory_is_the_same_from_any_directory(tmp_path: Path) -> None:
    """--dev from another directory must find the same token, not silently create a second one."""
    code = "from p11kms.cli import build_parser; print(build_parser().parse_args(['serve', '--dev']).dev_dir)"
    seen = {subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip() for cwd in (tmp_path, Path("/"))}
    assert len(seen) == 1
    (default,) = seen
    assert Path(default).is_absolute()
    assert default == str(Path(__file__).resolve().parent.parent / ".p11kms-dev")  # tests run from a checkout


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    config = tmp_path / "p11kms.cfg"
    config.write_bytes(b"\xef\xbb\xbf[KMSPlugin]\r\nPrimary_key = kek-1\r\nPKCS11_Module = /usr/lib/x.so\r\n"
                       b"Token_Label = t\r\nPIN_File = user.pin\r\n")
    assert load_config(config).primary_key == "kek-1"
