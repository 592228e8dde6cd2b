"""Log set-up. The logger is built here once and handed to the layers that log.

Records carry their fields in ``extra={"fields": {...}}``; the text format
prints them as ``key=value`` pairs and the JSON format as object members, so
the key UUID line the rotation procedure asks operators to find reads the same
either way.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from importlib import metadata
from typing import Any

import p11kms

LOGGER_NAME = "p11kms"


def build_info() -> dict[str, str]:
    """What is running: the start log line, ``p11kms --version`` and ``p11kms_build_info`` show the same."""
    try:
        grpcio = metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        grpcio = "unknown"
    return {"version": p11kms.__version__, "python": platform.python_version(), "grpcio": grpcio}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """logfmt: ``ts=... level=info msg="..." key=value ...``, one line per record, a traceback included
    (as a quoted ``exception`` field), so that log shippers parse every line the same way."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"ts": _timestamp(record), "level": record.levelname.lower()}
        line = " ".join(f"{k}={v}" for k, v in fields.items()) + f" msg={json.dumps(record.getMessage())}"
        pairs = dict(_fields(record))
        if record.exc_info:
            pairs["exception"] = self.formatException(record.exc_info)
        return " ".join([line, *(f"{k}={_quote(v)}" for k, v in pairs.items())])


def _quote(value: Any) -> str:
    """A value as one token: quoted, with escapes, when it is empty or has a space, quote, equals
    sign or any unprintable character. Values come from callers (a request uid), and a raw newline
    would let them forge whole log lines, such as the key lines operators read during a rotation."""
    text = str(value)
    plain = text and text.isprintable() and not any(c in text for c in ' "=')
    return text if plain else json.dumps(text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                                    "msg": record.getMessage()}
        document.update(_fields(record))
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def build_logger(log_format: str = "text", level: str = "info", stream: Any = None) -> logging.Logger:
    """Returns the plugin logger writing to ``stream`` (stderr by default) in the chosen format."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def stated_log_format(config_path: Any) -> str:
    """The ``Log_Format`` a config file states, read leniently before (or when) the file fails validation,
    so that even "config error; not started" comes out in the format the operator asked for."""
    try:
        with open(config_path, encoding="utf-8-sig", errors="replace") as handle:
            for line in handle:
                name, sep, value = line.partition("=")
                if sep and name.strip().lower() == "log_format":
                    return "json" if value.split("#")[0].split(";")[0].strip().lower() == "json" else "text"
    except OSError:
        pass
    return "text"


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
