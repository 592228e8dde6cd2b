"""The plugin configuration file.

The syntax is the INI dialect of vendor PKCS#11 configuration files such as
Utimaco's ``cs_pkcs11_R3.cfg`` (``Name = value``, ``#`` and ``;`` comments,
``[Section]`` headers), so one file can hold both the vendor library's settings
and the plugin's. Plugin attributes stand before the first section or inside a
``[KMSPlugin]`` section; every other section belongs to the vendor library and
is skipped. Attribute names are case-insensitive.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN_SECTION = "kmsplugin"
DEFAULT_SOCKET = "/run/p11kms/kms.sock"
DEFAULT_HTTP_PORT = 8095


class ConfigError(Exception):
    """The configuration cannot be used; the message names the attribute, the line and the fix."""


@dataclass(frozen=True)
class _Setting:
    name: str  # as written in the docs
    value: str
    line: int


@dataclass(frozen=True)
class PluginConfig:
    path: Path
    primary_key: str
    secondary_keys: tuple[str, ...]
    module: str
    token_label: str | None
    token_serial: str | None
    slot: int | None
    pin_file: Path | None
    pin_env: str | None
    socket: Path
    socket_mode: int = 0o600
    socket_group: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    sessions: int = 8
    health_interval: float = 10.0
    shutdown_grace: float = 10.0
    http_address: tuple[str, int] | None = ("127.0.0.1", DEFAULT_HTTP_PORT)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, attribute: str) -> str:
        """``file:line`` of an attribute, for messages about its value."""
        line = self.lines.get(attribute.lower())
        return f"{self.path}:{line}" if line else str(self.path)


# Canonical spelling of every plugin attribute, keyed by its lower-case form.
ATTRIBUTES = {name.lower(): name for name in (
    "Primary_key", "Secondary_key", "PKCS11_Module", "Token_Label", "Token_Serial", "Slot",
    "PIN_File", "PIN_Env", "Socket", "Socket_Mode", "Socket_Group", "Log_Format", "Log_Level",
    "Sessions", "Health_Interval", "Shutdown_Grace", "HTTP_Address",
)}
_SECRET_LOOKING = {"pin", "user_pin", "password", "so_pin"}
_COMMENT = re.compile(r"\s[#;].*$")


def _strip_value(raw: str) -> str:
    value = _COMMENT.sub("", raw).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def _unknown_attribute(path: Path, line: int, name: str) -> ConfigError:
    if name.lower() in _SECRET_LOOKING:
        return ConfigError(
            f"{path}:{line}: {name} is not accepted: p11kms never reads a PIN from its config file; "
            "put the PIN in a file readable only by the plugin and set PIN_File, or set PIN_Env"
        )
    hint = difflib.get_close_matches(name.lower(), list(ATTRIBUTES), n=1, cutoff=0.6)
    fix = f"did you mean {ATTRIBUTES[hint[0]]}?" if hint else f"known attributes: {', '.join(ATTRIBUTES.values())}"
    return ConfigError(f"{path}:{line}: unknown plugin attribute {name!r}; {fix}")


def parse_settings(text: str, path: Path) -> dict[str, _Setting]:
    """Collects the plugin's attributes from the file text, keyed by lower-case name."""
    settings: dict[str, _Setting] = {}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        in_plugin_scope = section is None or section.lower() == PLUGIN_SECTION
        name, sep, value = line.partition("=")
        name = name.strip()
        if not in_plugin_scope:
            if sep and name.lower() in ATTRIBUTES:
                raise ConfigError(
                    f"{path}:{number}: {name} is inside the vendor section [{section}], where the plugin "
                    "does not read it; move it before the first section or into a [KMSPlugin] section"
                )
            continue  # the vendor library's own setting
        if not sep or not name:
            raise ConfigError(f"{path}:{number}: expected 'Name = value', got {line!r}")
        key = name.lower()
        if key not in ATTRIBUTES:
            raise _unknown_attribute(path, number, name)
        if key in settings:
            raise ConfigError(
                f"{path}:{number}: {ATTRIBUTES[key]} is set twice (first on line {settings[key].line}); "
                "keep one; list several old keys as 'Secondary_key = label1, label2'"
            )
        settings[key] = _Setting(ATTRIBUTES[key], _strip_value(value), number)
    return settings


class _Reader:
    """Typed access to parsed settings, with errors that point at the offending line."""

    def __init__(self, settings: dict[str, _Setting], path: Path) -> None:
        self.settings = settings
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        setting = self.settings.get(key)
        where = f"{self.path}:{setting.line}" if setting else str(self.path)
        return ConfigError(f"{where}: {ATTRIBUTES[key]} {problem}")

    def text(self, key: str, default: str | None = None, *, required_fix: str = "") -> str | None:
        setting = self.settings.get(key)
        if setting is None:
            if required_fix:
                raise ConfigError(f"{self.path}: {ATTRIBUTES[key]} is missing; {required_fix}")
            return default
        if not setting.value:
            raise self.fail(key, "has an empty value; give a value or remove the line")
        return setting.value

    def number(self, key: str, default: float, *, low: float, high: float, integer: bool = False) -> float:
        raw = self.text(key)
        if raw is None:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            raise self.fail(key, f"must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low:g} and {high:g}, got {raw}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.text(key, default)
        assert raw is not None
        if raw.lower() not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()


def _labels(reader: _Reader) -> tuple[str, tuple[str, ...]]:
    primary = reader.text("primary_key", required_fix="set Primary_key to the label of the key that encrypts")
    assert primary is not None
    raw = reader.text("secondary_key", "") or ""
    secondaries = tuple(label.strip() for label in raw.split(",")) if raw else ()
    if any(not label for label in secondaries):
        raise reader.fail("secondary_key", f"has an empty label in {raw!r}; separate labels with single commas")
    seen: set[str] = set()
    for label in secondaries:
        if label in seen:
            raise reader.fail("secondary_key", f"lists {label!r} twice; list each old key once")
        seen.add(label)
    if primary in seen:
        raise reader.fail(
            "secondary_key",
            f"lists {primary!r}, which is the Primary_key; a key is either primary (encrypts) or "
            "secondary (only decrypts): remove it from Secondary_key",
        )
    return primary, secondaries


def _socket_mode(reader: _Reader) -> int:
    raw = reader.text("socket_mode", "0600")
    assert raw is not None
    try:
        mode = int(raw, 8)
    except ValueError:
        raise reader.fail("socket_mode", f"must be an octal mode such as 0600 or 0660, got {raw!r}") from None
    if mode & ~0o777 or mode & 0o007:
        raise reader.fail("socket_mode", f"{raw} must not grant access to others; use 0600 or 0660 with Socket_Group")
    return mode


def _http_address(reader: _Reader) -> tuple[str, int] | None:
    raw = reader.text("http_address", f"127.0.0.1:{DEFAULT_HTTP_PORT}")
    assert raw is not None
    if raw.lower() == "off":
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise reader.fail("http_address", f"must be HOST:PORT (e.g. 127.0.0.1:{DEFAULT_HTTP_PORT}) or off, got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: str | os.PathLike[str]) -> PluginConfig:
    """Reads and validates a configuration file. Raises ConfigError with the line and the fix."""
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path} is not UTF-8 text (invalid byte at offset {exc.start}); "
                          "save it as UTF-8") from exc
    reader = _Reader(parse_settings(text, config_path), config_path)
    primary, secondaries = _labels(reader)
    module = reader.text("pkcs11_module", required_fix="set PKCS11_Module to the vendor PKCS#11 library path")
    token_label = reader.text("token_label")
    token_serial = reader.text("token_serial")
    slot = reader.text("slot")
    if token_label is None and token_serial is None and slot is None:
        raise ConfigError(f"{config_path}: no token selected; set Token_Label, Token_Serial or Slot")
    pin_file, pin_env = reader.text("pin_file"), reader.text("pin_env")
    if (pin_file is None) == (pin_env is None):
        raise ConfigError(
            f"{config_path}: set exactly one of PIN_File (a file holding the user PIN) or PIN_Env "
            "(the name of an environment variable holding it)"
        )
    return PluginConfig(
        path=config_path,
        primary_key=primary,
        secondary_keys=secondaries,
        module=module or "",
        token_label=token_label,
        token_serial=token_serial,
        slot=int(reader.number("slot", 0, low=0, high=2**32 - 1, integer=True)) if slot is not None else None,
        pin_file=_relative_to(config_path, pin_file),
        pin_env=pin_env,
        socket=_relative_to(config_path, reader.text("socket", DEFAULT_SOCKET)) or Path(DEFAULT_SOCKET),
        socket_mode=_socket_mode(reader),
        socket_group=reader.text("socket_group"),
        log_format=reader.choice("log_format", "text", ("text", "json")),
        log_level=reader.choice("log_level", "info", ("debug", "info", "warning", "error")),
        sessions=int(reader.number("sessions", 8, low=1, high=256, integer=True)),
        health_interval=reader.number("health_interval", 10.0, low=0.5, high=300),
        shutdown_grace=reader.number("shutdown_grace", 10.0, low=0, high=600),
        http_address=_http_address(reader),
        lines={key: s.line for key, s in reader.settings.items()},
    )


def _relative_to(config_path: Path, value: str | None) -> Path | None:
    """Relative paths in the config are relative to the config file's directory."""
    if value is None:
        return None
    candidate = Path(value)
    return candidate if candidate.is_absolute() else config_path.parent / candidate


class PinError(Exception):
    """The PIN source named in the config cannot be read."""


def read_pin(config: PluginConfig) -> bytes:
    """Reads the user PIN from the configured file or environment variable. Never logs it."""
    if config.pin_file is not None:
        try:
            pin = config.pin_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise PinError(f"cannot read PIN_File {config.pin_file} ({config.where('pin_file')}): "
                           f"{exc.strerror}") from exc
        source = f"PIN_File {config.pin_file}"
    else:
        assert config.pin_env is not None
        value = os.environ.get(config.pin_env)
        if value is None:
            raise PinError(f"environment variable {config.pin_env} named by PIN_Env "
                           f"({config.where('pin_env')}) is not set")
        pin = value.encode()
        source = f"environment variable {config.pin_env}"
    if not pin:
        raise PinError(f"the PIN in {source} is empty")
    return pin


def pin_source_warnings(config: PluginConfig) -> list[str]:
    """Problems with how the PIN is stored that do not stop the plugin but that an operator must fix."""
    if config.pin_file is None:
        return []
    try:
        mode = config.pin_file.stat().st_mode & 0o777
    except OSError:
        return []  # unreadable files are reported when the PIN is read
    if mode & 0o077:
        return [f"PIN_File {config.pin_file} has mode {mode:04o}: other users may read or change the HSM PIN; "
                f"run: chmod 600 {config.pin_file}"]
    return []
