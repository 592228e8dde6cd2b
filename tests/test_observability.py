"""The log line formats: a caller-supplied value can never forge a line."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from p11kms.observability import build_logger, log_event, stated_log_format
from p11kms.ops.devenv import find_softhsm_module

# No space, quote or equals sign: tabs stand in for spaces, which text formats used to leave unquoted.
FORGED = "abc\n2026-11-27T00:00:00.000Z\tINFO\tkeyring\tloaded:\tkey\trole:primary"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_newline_in_a_field_stays_inside_one_line(log_format: str) -> None:
    stream = io.StringIO()
    logger = build_logger(log_format, "info", stream)
    log_event(logger, logging.WARNING, "request failed", method="Decrypt", uid=FORGED)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    if log_format == "text":
        assert 'uid="abc\\n2026-11-27' in lines[0]
    else:
        assert json.loads(lines[0])["uid"] == FORGED


def test_plain_values_stay_unquoted_for_grep() -> None:
    stream = io.StringIO()
    log_event(build_logger("text", "info", stream), logging.INFO, "keyring loaded", role="primary",
              uuid="3f0e7c5d-2b10-4c1f-9a43-6c1f2f4e8d2b", note="two words", control="a\tb")
    line = stream.getvalue()
    assert "role=primary uuid=3f0e7c5d-2b10-4c1f-9a43-6c1f2f4e8d2b" in line
    assert 'note="two words"' in line and 'control="a\\tb"' in line


def test_text_format_is_logfmt_with_a_quoted_message() -> None:
    stream = io.StringIO()
    log_event(build_logger("text", "info", stream), logging.WARNING, "reload failed; still serving", error="x=1")
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(r'ts=\S+Z level=warning msg="reload failed; still serving" error="x=1"', line), line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_stays_inside_one_line_of_the_format(log_format: str) -> None:
    stream = io.StringIO()
    logger = build_logger(log_format, "info", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.critical("unexpected error; stopped", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    if log_format == "json":
        assert "RuntimeError: boom" in json.loads(lines[0])["exception"]
    else:
        assert lines[0].startswith("ts=") and 'exception="Traceback' in lines[0] and "RuntimeError: boom" in lines[0]


@pytest.mark.parametrize(("attributes", "exit_code", "message", "error"), [
    ("Primary_kee = kek-1\n", 2, "config error; not started", "Primary_kee"),             # a misspelled attribute
    ("Primary_key = kek-1\nPKCS11_Module = {module}\nToken_Label = t\nSocket = a-file\n", 1, "not started",
     "is not a socket"),                                                                   # refused at start
])
def test_fatal_start_errors_come_out_as_json(tmp_path: Path, attributes: str, exit_code: int, message: str,
                                             error: str) -> None:
    config = tmp_path / "p11kms.cfg"
    config.write_text("Log_Format = json\nPIN_Env = P11KMS_TEST_PIN\nHTTP_Address = off\n"
                      + attributes.format(module=find_softhsm_module()))
    (tmp_path / "tokens").mkdir()
    (tmp_path / "a-file").write_text("not a socket")
    (tmp_path / "softhsm2.conf").write_text(f"directories.tokendir = {tmp_path / 'tokens'}\n")
    env = {"PATH": "/usr/bin:/bin", "P11KMS_TEST_PIN": "1234", "SOFTHSM2_CONF": str(tmp_path / "softhsm2.conf")}
    result = subprocess.run([sys.executable, "-m", "p11kms", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == exit_code, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert records and records[-1]["level"] == "critical" and records[-1]["msg"] == message
    assert error in records[-1]["error"]


def test_stated_log_format_reads_a_broken_file_leniently(tmp_path: Path) -> None:
    config = tmp_path / "p11kms.cfg"
    config.write_bytes(b"\xef\xbb\xbf[KMSPlugin]\n  log_format =  JSON   # comment\nnonsense\n")
    assert stated_log_format(config) == "json"
    assert stated_log_format(tmp_path / "absent.cfg") == "text"
