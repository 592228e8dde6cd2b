"""The ``p11kms`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from p11kms.client import DEFAULT_TIMEOUT, KmsClient
from p11kms.config import ConfigError, PinError, PluginConfig, load_config
from p11kms.devenv import DEFAULT_DEV_DIR, prepare_dev_environment
from p11kms.hsm.errors import HsmError
from p11kms.hsm.keyident import create_kek, key_uuid
from p11kms.keyring import KeyringError
from p11kms.observability import build_logger, log_event
from p11kms.server import Plugin, SocketInUse, install_signal_handlers, open_configured_token

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _add_config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="plugin config file (INI, e.g. cs_pkcs11_R3.cfg)")
    source.add_argument("--dev", action="store_true",
                        help="use the embedded development SoftHSM2 token (created on first use); not for production")
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV_DIR,
                        help=f"directory of the development token (default {DEFAULT_DEV_DIR})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p11kms", description="Kubernetes KMS v2 plugin backed by a PKCS#11 HSM")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve KMS v2 on the configured Unix socket")
    _add_config_source(serve)

    keys = commands.add_parser("keys", help="create and list key-encryption keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create an AES-256 KEK in the HSM")
    _add_config_source(create)
    create.add_argument("--label", required=True, help="label of the new key")
    listing = key_commands.add_parser("list", help="list secret keys with their UUIDs and roles")
    _add_config_source(listing)

    status = commands.add_parser("status", help="call Status like kube-apiserver does")
    status.add_argument("--socket", type=Path, required=True, help="plugin socket path")
    status.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-call deadline in seconds")
    return parser


def _config(args: argparse.Namespace) -> PluginConfig:
    path = prepare_dev_environment(args.dev_dir) if args.dev else args.config
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    logger = build_logger(config.log_format, config.log_level)
    if args.dev:
        log_event(logger, logging.WARNING, "DEVELOPMENT MODE: private SoftHSM2 token with its PIN on disk; "
                  "not for production", directory=str(args.dev_dir.resolve()), config=str(config.path))
    plugin = Plugin(config, logger)
    install_signal_handlers(plugin)
    plugin.start()
    plugin.run_until_stopped()
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    token = open_configured_token(_config(args))
    try:
        new_uuid = create_kek(token, args.label)
    finally:
        token.close()
    print(f"created key label={args.label} uuid={new_uuid}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    config = _config(args)
    roles = {config.primary_key: "primary", **{label: "secondary" for label in config.secondary_keys}}
    token = open_configured_token(config)
    try:
        rows = []
        for handle in token.find_secret_keys():
            attrs = token.key_attributes(handle)
            if attrs.key_type != 0x1F:  # only AES keys can be KEKs
                continue
            uuid_value, source = key_uuid(token, attrs)
            rows.append((attrs.label, str(uuid_value), roles.get(attrs.label, "-"), source))
    finally:
        token.close()
    print(f"{'LABEL':<24} {'UUID':<36} {'ROLE':<10} UUID_SOURCE")
    for label, uuid_text, role, source in sorted(rows):
        print(f"{label:<24} {uuid_text:<36} {role:<10} {source}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with KmsClient(args.socket, args.timeout) as client:
        try:
            reply = client.status()
        except grpc.RpcError as exc:
            print(f"Status failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_FAILURE
    print(f"version: {reply.version}\nhealthz: {reply.healthz}\nkey_id:  {reply.key_id}")
    return 0 if reply.healthz == "ok" else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve,
        "status": cmd_status,
        "keys": cmd_keys_create if getattr(args, "keys_command", None) == "create" else cmd_keys_list,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, PinError) as exc:
        print(f"p11kms: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (HsmError, KeyringError, SocketInUse, FileNotFoundError) as exc:
        print(f"p11kms: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
