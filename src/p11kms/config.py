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
import grp
import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN_SECTION = "kmsplugin"
DEFAULT_SOCKET = "/run/p11kms/kms.sock"
DEFAULT_HTTP_PORT = 8095
# sun_path holds 108 bytes including the terminating NUL; grpc refuses longer paths only at bind time.
MAX_SOCKET_PATH_BYTES = 107
# serve first binds a private name of this many bytes beside the socket (a dot, a digest of the socket's
# name, a dot and random hex: plugin/server.py staging_path), so the directory must leave room for it too.
STAGING_NAME_BYTES = 16
# Mode of a socket directory serve creates: nothing for others, like Socket_Mode, and the same as the
# systemd unit's RuntimeDirectoryMode and the static pod's init container.
SOCKET_DIRECTORY_MODE = 0o750


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
    socket_gid: int | None = None  # Socket_Group resolved when the config is loaded
    log_format: str = "text"
    log_level: str = "info"
    sessions: int = 8
    max_calls: int = 1024
    health_interval: float = 10.0
    shutdown_grace: float = 10.0
    # How long a reconnect waits for calls stuck inside the PKCS#11 module before the process exits
    # to be restarted with the module loaded afresh; None: wait for ever.
    stuck_call_exit: float | None = 60.0
    http_address: tuple[str, int] | None = ("127.0.0.1", DEFAULT_HTTP_PORT)
    gcm_iv: str = "auto"  # who chooses AES-GCM IVs: auto, caller or hsm
    module_init_args: str | None = None  # passed as pReserved of C_Initialize (NSS softoken)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, attribute: str) -> str:
        """``file:line`` of an attribute, for messages about its value."""
        line = self.lines.get(attribute.lower())
        return f"{self.path}:{line}" if line else str(self.path)


# Canonical spelling of every plugin attribute, keyed by its lower-case form.
ATTRIBUTES = {name.lower(): name for name in (
    "Primary_key", "Secondary_key", "PKCS11_Module", "Token_Label", "Token_Serial", "Slot",
    "PIN_File", "PIN_Env", "Socket", "Socket_Mode", "Socket_Group", "Log_Format", "Log_Level",
    "Sessions", "Max_Calls", "Health_Interval", "Shutdown_Grace", "Stuck_Call_Exit", "HTTP_Address",
    "GCM_IV", "Module_Init_Args",
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


def label_problem(label: str) -> str | None:
    """What makes ``label`` unfit to name a KEK, or None; the one rule for ``keys create`` and the config.

    A key whose label the config cannot state exactly is a key no plugin can select: surrounding
    whitespace is stripped from config values, a comma splits Secondary_key, " #" or " ;" starts a
    comment, and control or invisible characters make two different labels look the same.
    """
    if not label:
        return "is empty"
    if label != label.strip():
        return "begins or ends with whitespace"
    if "," in label:
        return "contains a comma, which separates the labels of Secondary_key"
    if re.search(r"\s[#;]", label):
        return "contains ' #' or ' ;', which starts a comment in the config file"
    odd = next((c for c in label if unicodedata.category(c) in ("Cc", "Cf")), None)
    if odd is not None:
        return f"contains the invisible or control character U+{ord(odd):04X}"
    return None


_LABEL_FIX = "write the key's exact label (p11kms keys list shows them)"


def _checked_label(reader: _Reader, key: str, label: str) -> None:
    problem = label_problem(label)
    if problem is not None:
        raise reader.fail(key, f"label {label!r} {problem}; {_LABEL_FIX}")


def _labels(reader: _Reader) -> tuple[str, tuple[str, ...]]:
    primary = reader.text("primary_key", required_fix="set Primary_key to the label of the key that encrypts")
    assert primary is not None
    _checked_label(reader, "primary_key", primary)
    raw = reader.text("secondary_key", "") or ""
    secondaries = tuple(label.strip() for label in raw.split(",")) if raw else ()
    if any(not label for label in secondaries):
        raise reader.fail("secondary_key", f"has an empty label in {raw!r}; separate labels with single commas")
    seen: set[str] = set()
    for label in secondaries:
        _checked_label(reader, "secondary_key", label)
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


def _socket_path(reader: _Reader) -> Path:
    """The socket path, refused at load when it cannot be bound: grpc would fail only after start."""
    socket = _relative_to(reader.path, reader.text("socket", DEFAULT_SOCKET)) or Path(DEFAULT_SOCKET)
    if "\0" in str(socket):
        raise reader.fail("socket", "contains a NUL character; write the socket path without it")
    size = max(len(os.fsencode(socket)), len(os.fsencode(socket.parent)) + 1 + STAGING_NAME_BYTES)
    if size > MAX_SOCKET_PATH_BYTES:
        raise reader.fail("socket", f"{socket} is {size} bytes; a Unix socket path can be at most "
                                    f"{MAX_SOCKET_PATH_BYTES} bytes: choose a shorter path such as {DEFAULT_SOCKET}")
    return socket


def _socket_gid(reader: _Reader) -> int | None:
    """Resolves Socket_Group now, so a misspelt group stops the start before the socket exists."""
    group = reader.text("socket_group")
    if group is None:
        return None
    if group.isdigit():
        gid = int(group)
        if gid >= 2**32 - 1:  # (gid_t)-1 means "unchanged" to chown
            raise reader.fail("socket_group", f"gid {group} is out of range")
        return gid
    try:
        return grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        names = [entry.gr_name for entry in grp.getgrall()]
        hint = difflib.get_close_matches(group, names, n=1, cutoff=0.6)
        fix = f"did you mean {hint[0]}?" if hint else "create the group or give an existing group name or gid"
        raise reader.fail("socket_group", f"names no group {group!r} on this host; {fix}") from None


def _check_pin_env(reader: _Reader) -> None:
    """An environment variable cannot change while the process runs: unset or empty is a config error.
    A variable this process already took (see read_pin) passes, so a reload still loads."""
    name = reader.text("pin_env")
    if name is None or name in _TAKEN_ENV_PINS:
        return
    value = os.environ.get(name)
    if value is None:
        raise reader.fail("pin_env", f"names the environment variable {name}, which is not set for this process; "
                                     "set it in the plugin's environment (systemd Environment=, the pod's env) "
                                     "or use PIN_File")
    if not value:
        raise reader.fail("pin_env", f"names the environment variable {name}, which is empty; put the user PIN "
                                     "in it or use PIN_File")


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
        text = config_path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not a name
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
    _check_pin_env(reader)
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
        socket=_socket_path(reader),
        socket_mode=_socket_mode(reader),
        socket_group=reader.text("socket_group"),
        socket_gid=_socket_gid(reader),
        log_format=reader.choice("log_format", "text", ("text", "json")),
        log_level=reader.choice("log_level", "info", ("debug", "info", "warning", "error")),
        sessions=int(reader.number("sessions", 8, low=1, high=256, integer=True)),
        max_calls=int(reader.number("max_calls", 1024, low=1, high=10000, integer=True)),
        health_interval=reader.number("health_interval", 10.0, low=0.5, high=300),
        shutdown_grace=reader.number("shutdown_grace", 10.0, low=0, high=600),
        stuck_call_exit=_seconds_or_off(reader, "stuck_call_exit", 60.0, low=1, high=3600),
        http_address=_http_address(reader),
        gcm_iv=reader.choice("gcm_iv", "auto", ("auto", "caller", "hsm")),
        module_init_args=reader.text("module_init_args"),
        lines={key: s.line for key, s in reader.settings.items()},
    )


def _seconds_or_off(reader: _Reader, key: str, default: float, *, low: float, high: float) -> float | None:
    raw = reader.text(key)
    if raw is not None and raw.lower() == "off":
        return None
    try:
        return reader.number(key, default, low=low, high=high)
    except ConfigError as exc:
        raise reader.fail(key, f"must be a number of seconds between {low:g} and {high:g}, or off, got {raw!r}"
                          ) from exc


def _relative_to(config_path: Path, value: str | None) -> Path | None:
    """Relative paths in the config are relative to the config file's directory."""
    if value is None:
        return None
    candidate = Path(value)
    return candidate if candidate.is_absolute() else config_path.parent / candidate


def socket_directory_problem(socket: Path) -> str | None:
    """Why serve could neither use nor create the socket's directory, or None.

    Serve creates one missing level (the socket's own directory) when its parent exists; a deeper
    missing path is more likely a typo than a wish, and would be created with nobody's intent.
    """
    directory = socket.parent
    if directory.is_dir():
        return None
    if os.path.lexists(directory):
        return f"{directory} exists and is not a directory"
    if not directory.parent.is_dir():
        return f"neither {directory} nor its parent {directory.parent} exists; serve creates only the last level"
    return None


def prepare_socket_directory(config: PluginConfig) -> Path | None:
    """Creates the socket's directory when only that level is missing: mode 0750 and, with
    Socket_Group, that group, so members reach a 0660 socket. Returns the directory it created, or
    None. Raises ConfigError when the directory cannot be used."""
    directory = config.socket.parent
    problem = socket_directory_problem(config.socket)
    if problem is not None:
        raise ConfigError(f"{config.where('socket')}: Socket {config.socket}: {problem}; create it "
                          f"(mkdir -p -m {SOCKET_DIRECTORY_MODE:04o} {directory}) or correct Socket")
    if directory.is_dir():
        return None
    directory.mkdir(mode=SOCKET_DIRECTORY_MODE)
    os.chmod(directory, SOCKET_DIRECTORY_MODE)  # mkdir's mode is narrowed by the umask
    if config.socket_gid is not None:
        os.chown(directory, -1, config.socket_gid)
    return directory


class PinError(Exception):
    """The PIN source named in the config cannot be used; ``fix`` says what the operator must do."""

    def __init__(self, message: str, fix: str = "make the PIN source readable by the plugin") -> None:
        super().__init__(message)
        self.fix = fix


# PINs read from PIN_Env, by variable name. The variable leaves the environment at the first read
# (children and later forks must not inherit it), yet a reconnect must log in again.
_TAKEN_ENV_PINS: dict[str, bytes] = {}


def read_pin(config: PluginConfig) -> bytes:
    """Reads the user PIN from the configured file or environment variable. Never logs it."""
    if config.pin_file is not None:
        return _read_pin_file(config, config.pin_file)
    assert config.pin_env is not None
    return _take_env_pin(config, config.pin_env)


def _read_pin_file(config: PluginConfig, path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PinError(f"cannot read PIN_File {path} ({config.where('pin_file')}): {exc.strerror}") from exc
    pin = raw.rstrip(b"\r\n")  # the line ending an editor or `echo` adds is not part of the PIN
    if not pin.strip():
        blank = " (only whitespace)" if pin else ""
        raise PinError(f"PIN_File {path} is empty{blank}", f"write the user PIN into {path}")
    if pin != pin.strip():
        # Refused rather than tried: a wrong PIN spends one of the few attempts before the HSM locks.
        raise PinError(f"the PIN in PIN_File {path} begins or ends with whitespace other than one line ending",
                       f"remove the spaces, tabs or blank lines around the PIN in {path}; a PIN that really "
                       "has them can be given verbatim through PIN_Env")
    return pin


def _take_env_pin(config: PluginConfig, name: str) -> bytes:
    value = os.environ.pop(name, None)
    if value:
        _TAKEN_ENV_PINS[name] = value.encode()
    pin = _TAKEN_ENV_PINS.get(name)
    if pin is None:
        state = "is empty" if value == "" else "is not set"
        raise PinError(f"environment variable {name} named by PIN_Env ({config.where('pin_env')}) {state}",
                       f"set {name} in the plugin's environment or use PIN_File")
    return pin


def pin_source_warnings(config: PluginConfig) -> list[str]:
    """Problems with how the PIN is stored that do not stop the plugin but that an operator must fix."""
    path = config.pin_file
    if path is None:
        return []
    try:
        link = path.lstat()
        target = path.stat()
    except OSError:
        return []  # unreadable files are reported when the PIN is read
    warnings = []
    if stat.S_ISLNK(link.st_mode) and not _is_secret_volume_link(path):
        warnings.append(f"PIN_File {path} is a symbolic link to {path.resolve()}: whoever can change the link "
                        f"chooses the PIN the plugin sends; set PIN_File to {path.resolve()} itself")
    mode = target.st_mode & 0o777
    if mode & 0o077:
        warnings.append(f"PIN_File {path} has mode {mode:04o}: other users may read or change the HSM PIN; "
                        f"run: chmod 600 {path}")
    if target.st_uid not in (os.geteuid(), 0):  # root can read anything anyway
        warnings.append(f"PIN_File {path} is owned by uid {target.st_uid}, not by the plugin's user (uid "
                        f"{os.geteuid()}) or root: that user may read or change the HSM PIN; "
                        f"run: chown {os.geteuid()} {path}")
    return warnings


def _is_secret_volume_link(path: Path) -> bool:
    """A Kubernetes Secret or ConfigMap volume file: ``name -> ..data/name``, with ``..data`` a link
    the kubelet swaps atomically on update. The kubelet owns both links, so they are not a risk."""
    try:
        target = os.readlink(path)
    except OSError:
        return False
    return target == f"..data/{path.name}" and (path.parent / "..data").is_symlink()
