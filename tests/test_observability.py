"""The log line formats: a caller-supplied value can never forge a line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from p11kms.observability import build_logger, log_event

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
    log_event(build_logger("text", "info", stream), logging.INFO, "keyring loaded: key", role="primary",
              uuid="3f0e7c5d-2b10-4c1f-9a43-6c1f2f4e8d2b", note="two words", control="a\tb")
    line = stream.getvalue()
    assert "role=primary uuid=3f0e7c5d-2b10-4c1f-9a43-6c1f2f4e8d2b" in line
    assert 'note="two words"' in line and 'control="a\\tb"' in line
