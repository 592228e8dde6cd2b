"""The ``p11kms`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from p11kms.config import ConfigError, PinError, PluginConfig, load_config
from p11kms.hsm.errors import HsmError
from p11kms.kube.client import DEFAULT_TIMEOUT, KmsClient, socket_path
from p11kms.kube.etcd import EtcdClient, EtcdError, EtcdTlsOptionError
from p11kms.observability import build_logger, log_event
from p11kms.ops.checks import Check, render
from p11kms.ops.devenv import DEFAULT_DEV_DIR, prepare_dev_environment
from p11kms.ops.doctor import run_doctor
from p11kms.ops.etcdscan import describe_value, parse_key_uuid, require_key, scan
from p11kms.ops.etcdscan_report import render_json, render_text
from p11kms.ops.keys import create_key, list_keys
from p11kms.ops.preflight import run_checks
from p11kms.plugin.keyring import KeyringError
from p11kms.plugin.server import Plugin, SocketInUse, install_signal_handlers

EXIT_USAGE = 2
EXIT_FAILURE = 1
T = TypeVar("T")


def _add_config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="plugin config file (INI, e.g. cs_pkcs11_R3.cfg)")
    source.add_argument("--dev", action="store_true",
                        help="use the embedded development SoftHSM2 token (created on first use); not for production")
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV_DIR,
                        help=f"directory of the development token (default {DEFAULT_DEV_DIR})")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError: its message becomes the usage error (exit 2)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


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

    for name, text in (("status", "call Status like kube-apiserver does"),
                       ("check", "pre-flight: call the plugin as kube-apiserver does and apply all its checks")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--socket", type=_argument(socket_path), required=True,
                             help="plugin socket: a path, or unix:///path as in the EncryptionConfiguration")
        command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-call deadline in seconds")

    doctor = commands.add_parser("doctor", help="pre-flight of the node: module, token, login, keys, socket, "
                                                "EncryptionConfiguration")
    _add_config_source(doctor)
    doctor.add_argument("--encryption-config", type=Path, help="kube-apiserver's EncryptionConfiguration file")

    etcd = commands.add_parser("etcd", help="read-only tools for kube-apiserver's etcd")
    etcd_commands = etcd.add_subparsers(dest="etcd_command", required=True)
    scan = etcd_commands.add_parser("scan", help="count stored objects per KMS provider and key UUID")
    scan.add_argument("--endpoints", required=True, help="etcd client URLs, comma-separated")
    scan.add_argument("--cacert", help="CA bundle for https endpoints")
    scan.add_argument("--cert", help="client certificate (PEM)")
    scan.add_argument("--key", help="client certificate key (PEM)")
    scan.add_argument("--prefix", default="/registry/",
                      help="kube-apiserver's --etcd-prefix (default /registry; read as /registry/)")
    scan.add_argument("--page-size", type=int, default=500, help="keys read per request")
    scan.add_argument("--require", metavar="UUID", type=_argument(parse_key_uuid),
                      help="gate: exit 0 only if objects were checked and all are on this key UUID; exit 1 and "
                           "list the objects that are not; exit 3 if nothing was checked")
    scan.add_argument("--resource", action="append",
                      help="with --require: resource to check, e.g. secrets (repeatable; default: all that hold "
                           "KMS v2 objects)")
    scan.add_argument("--show", metavar="KEY", help="print one object's envelope (no decryption) and exit")
    scan.add_argument("--json", action="store_true", help="machine-readable report")
    scan.add_argument("--progress", action="store_true", help="show progress on stderr")
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
    new_uuid = create_key(_config(args), args.label)
    print(f"created key label={args.label} uuid={new_uuid}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    print(f"{'LABEL':<24} {'UUID':<36} {'ROLE':<10} UUID_SOURCE")
    for row in list_keys(_config(args)):
        print(f"{row.label:<24} {row.uuid:<36} {row.role:<10} {row.uuid_source}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with KmsClient(args.socket, args.timeout) as client:
        try:
            reply = client.status()
        except grpc.RpcError as exc:
            print(f"p11kms: Status failed: {client.explain(exc)}", file=sys.stderr)
            return EXIT_FAILURE
    print(f"version: {reply.version}\nhealthz: {reply.healthz}\nkey_id:  {reply.key_id}")
    return 0 if reply.healthz == "ok" else EXIT_FAILURE


def cmd_check(args: argparse.Namespace) -> int:
    with KmsClient(args.socket, args.timeout) as client:
        return _print_checks(run_checks(client))


def cmd_doctor(args: argparse.Namespace) -> int:
    path = prepare_dev_environment(args.dev_dir) if args.dev else args.config
    return _print_checks(run_doctor(path, args.encryption_config))


def _print_checks(checks: list[Check]) -> int:
    lines, all_passed = render(checks)
    print("\n".join(lines))
    return 0 if all_passed else EXIT_FAILURE


def cmd_etcd_scan(args: argparse.Namespace) -> int:
    if args.resource and args.require is None:
        print("p11kms: --resource only applies with --require UUID", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = EtcdClient(args.endpoints.split(","), cacert=args.cacert, cert=args.cert, key=args.key)
    except EtcdTlsOptionError as exc:
        print(f"p11kms: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.show:
        stored = client.get(args.show.encode())
        if stored is None:
            print(f"no key {args.show} in etcd", file=sys.stderr)
            return EXIT_FAILURE
        for name, value in describe_value(stored):
            print(f"{name + ':':<21}{value}")
        return 0

    def show_progress(count: int) -> None:
        print(f"\rscanned {count} keys", end="", file=sys.stderr, flush=True)

    report = scan(client, args.prefix, page_size=args.page_size, require=args.require,
                  progress=show_progress if args.progress else None)
    if args.progress:
        print(file=sys.stderr)
    gate = require_key(report, args.require, set(args.resource or ())) if args.require else None
    if args.json:
        print(render_json(report, gate))  # the gate goes inside, so stdout stays one JSON document
    else:
        print(render_text(report))
        if gate is not None:
            print("\n".join(gate.lines))
    return gate.exit_code if gate is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve,
        "status": cmd_status,
        "check": cmd_check,
        "doctor": cmd_doctor,
        "etcd": cmd_etcd_scan,
        "keys": cmd_keys_create if getattr(args, "keys_command", None) == "create" else cmd_keys_list,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, PinError) as exc:
        print(f"p11kms: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (HsmError, KeyringError, SocketInUse, FileNotFoundError, EtcdError) as exc:
        print(f"p11kms: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
