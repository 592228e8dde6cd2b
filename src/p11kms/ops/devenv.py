"""The embedded default: a private SoftHSM2 token and a first KEK, for development only.

``p11kms serve --dev`` keeps everything in one directory: the SoftHSM2
configuration and token store, random PINs in 0600 files, a plugin config file
and the socket. Nothing here is fit for production: the PINs sit next to the token.

The default directory does not depend on the current directory, so ``--dev`` run
from elsewhere finds the same token (and key UUID) instead of silently making a
second one: ``.p11kms-dev`` in the repository when p11kms runs from a source
checkout (as ``scripts/dev.sh`` does), else ``~/.local/share/p11kms/dev``.
``--dev-dir`` chooses another.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from p11kms.hsm.errors import TokenNotFound
from p11kms.hsm.keyident import create_kek
from p11kms.hsm.module import load_module
from p11kms.hsm.provision import init_token
from p11kms.hsm.token import open_token


def default_dev_dir() -> Path:
    """The repository's ``.p11kms-dev`` in a source checkout, else one per user; never cwd-relative."""
    repository = Path(__file__).resolve().parents[3]  # src/p11kms/ops/devenv.py -> the checkout
    if (repository / "pyproject.toml").is_file() and (repository / "src" / "p11kms").is_dir():
        return repository / ".p11kms-dev"
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "p11kms" / "dev"


DEFAULT_DEV_DIR = default_dev_dir()
DEV_TOKEN_LABEL = "p11kms-dev"
DEV_FIRST_KEY = "kek-1"
SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)


def find_softhsm_module() -> str:
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise FileNotFoundError(
        "SoftHSM2 is not installed (looked for libsofthsm2.so in "
        f"{', '.join(SOFTHSM_MODULE_CANDIDATES)}); install it, e.g. 'apt-get install softhsm2'"
    )


def write_softhsm_conf(directory: Path) -> Path:
    """Writes a SoftHSM2 config whose token store lives in ``directory/tokens``; returns its path."""
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def _secret_file(path: Path) -> bytes:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(16) + "\n")
    return path.read_bytes().strip()


def _config_text(module: str) -> str:
    return (
        "# p11kms development config, written by 'p11kms serve --dev'. NOT FOR PRODUCTION.\n"
        "# Rotate as in the guide: Secondary_key = old Primary_key, Primary_key = new label,\n"
        "# then restart the plugin (or send it SIGHUP).\n"
        f"Primary_key = {DEV_FIRST_KEY}\n"
        f"PKCS11_Module = {module}\n"
        f"Token_Label = {DEV_TOKEN_LABEL}\n"
        "PIN_File = user.pin\n"
        "Socket = kms.sock\n"
        "Log_Level = info\n"
    )


def prepare_dev_environment(directory: Path = DEFAULT_DEV_DIR) -> Path:
    """Creates (once) the dev token, its first KEK and config; returns the config file path.

    Sets SOFTHSM2_CONF for this process, so it must run before the module is loaded.
    """
    directory = directory.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    if not conf.exists():
        write_softhsm_conf(directory)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    module_path = find_softhsm_module()
    user_pin = _secret_file(directory / "user.pin")
    module = load_module(module_path)
    try:
        info = module.find_token(label=DEV_TOKEN_LABEL, serial=None, slot=None)
    except TokenNotFound:
        info = init_token(module, DEV_TOKEN_LABEL, _secret_file(directory / "so.pin"), user_pin)
    token = open_token(module, info, user_pin, pool_size=1)
    try:
        if not token.find_secret_keys(DEV_FIRST_KEY):
            create_kek(token, DEV_FIRST_KEY)
    finally:
        token.close()
    config = directory / "p11kms.cfg"
    if not config.exists():
        config.write_text(_config_text(module_path))
    return config
