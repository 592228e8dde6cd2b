"""Log set-up. The logger is built here once and handed to the layers that log.

Records carry their fields in ``extra={"fields": {...}}``; the text format
prints them as ``key=value`` pairs and the JSON format as object members, so
the key UUID line the rotation procedure asks operators to find reads the same
either way.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "p11kms"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={_quote(v)}" for k, v in _fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.getMessage()}"
        line = f"{line} {pairs}" if pairs else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


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


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
