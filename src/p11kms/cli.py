"""The ``p11kms`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from p11kms.config import ConfigError, PinError, PluginConfig, load_config
from p11kms.hsm.errors import HsmError
from p11kms.kube.client import DEFAULT_TIMEOUT, KmsClient, socket_path
from p11kms.kube.etcd import EtcdClient, EtcdError, EtcdTlsOptionError
from p11kms.observability import build_info, build_logger, log_event, stated_log_format
from p11kms.ops import rotate
from p11kms.ops.checks import Check, render
from p11kms.ops.cluster import cluster_status
from p11kms.ops.devenv import DEFAULT_DEV_DIR, prepare_dev_environment
from p11kms.ops.doctor import run_doctor
from p11kms.ops.etcdscan import describe_value, parse_key_uuid, require_key, scan
from p11kms.ops.etcdscan_report import render_json, render_text, rewrite_commands
from p11kms.ops.keys import adopt, create_key, list_keys, restrict
from p11kms.ops.preflight import run_checks
from p11kms.plugin.keyring import KeyringError
from p11kms.plugin.server import Plugin, install_signal_handlers
from p11kms.plugin.socketowner import SocketInUse

EXIT_USAGE = 2
EXIT_FAILURE = 1
T = TypeVar("T")


def _add_config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path,
                        help="plugin config file (INI; deployments use /etc/p11kms/p11kms.cfg)")
    source.add_argument("--dev", action="store_true",
                        help="use the embedded development SoftHSM2 token (created on first use); not for production")
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV_DIR,
                        help="directory of the development token, the same whatever the current directory "
                             "(default: %(default)s)")


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
    info = build_info()
    parser.add_argument("--version", action="version",
                        version=f"p11kms {info['version']} (python {info['python']}, grpcio {info['grpcio']})")
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
    adopt_parser = key_commands.add_parser(
        "adopt", help="store a fresh UUID in CKA_ID of a key made by another tool; run it on the primary HSM "
                      "before replicas or backups of the key are made")
    _add_config_source(adopt_parser)
    adopt_parser.add_argument("--label", required=True, help="label of the key to adopt")
    restrict_parser = key_commands.add_parser(
        "restrict", help="clear CKA_WRAP and CKA_DERIVE of a key in place, where the HSM allows it (same key, "
                         "same UUID)")
    _add_config_source(restrict_parser)
    restrict_parser.add_argument("--label", required=True, help="label of the key to restrict")

    for name, text in (("status", "call Status like kube-apiserver does"),
                       ("check", "pre-flight: call the plugin as kube-apiserver does and apply all its checks")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--socket", type=_argument(socket_path), required=True,
                             help="plugin socket: a path, or unix:///path as in the EncryptionConfiguration")
        command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                             help="per-call deadline in seconds (default: %(default)s)")

    doctor = commands.add_parser("doctor", help="pre-flight of the node: module, token, login, keys, socket, "
                                                "EncryptionConfiguration")
    _add_config_source(doctor)
    doctor.add_argument("--encryption-config", type=Path, help="kube-apiserver's EncryptionConfiguration file")

    etcd = commands.add_parser("etcd", help="read-only tools for kube-apiserver's etcd")
    etcd_commands = etcd.add_subparsers(dest="etcd_command", required=True)
    scan = etcd_commands.add_parser("scan", help="count stored objects per KMS provider and key UUID")
    scan.add_argument("--endpoints", required=True, help="etcd client URLs, comma-separated")
    _add_etcd_tls(scan)
    scan.add_argument("--prefix", default="/registry/",
                      help="kube-apiserver's --etcd-prefix, read with a trailing / (default: %(default)s)")
    scan.add_argument("--page-size", type=int, default=500, help="keys read per request (default: %(default)s)")
    scan.add_argument("--require", metavar="UUID", type=_argument(parse_key_uuid),
                      help="gate: exit 0 only if objects were checked and all are on this key UUID; exit 1 and "
                           "list the objects that are not; exit 3 if nothing was checked")
    scan.add_argument("--resource", action="append",
                      help="with --require: also check this resource, e.g. secrets, whose objects may all be in "
                           "clear (repeatable; every resource holding KMS v2 objects is always checked)")
    scan.add_argument("--show", metavar="KEY", help="print one object's envelope (no decryption) and exit")
    scan.add_argument("--json", action="store_true", help="machine-readable report")
    scan.add_argument("--progress", action="store_true", help="show progress on stderr")
    scan.add_argument("--config", type=Path, help="plugin config: name each key UUID's label (looked up in its HSM)")
    scan.add_argument("--rewrite-commands", action="store_true",
                      help="with --require: print the kubectl commands that rewrite only the objects not on the key")
    _add_rotate_parsers(commands)
    _add_reencrypt_parser(commands)
    cluster = commands.add_parser("cluster", help="views over the plugins of every control-plane node")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    cluster_status_parser = cluster_commands.add_parser(
        "status", help="per node: primary, decrypt-only keys, health, config generation; fails when a node "
                       "cannot decrypt another node's primary")
    cluster_status_parser.add_argument("--endpoints", required=True,
                                       help="comma-separated: http://HOST:PORT of each plugin, or socket paths")
    cluster_status_parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                                       help="per-call deadline in seconds (default: %(default)s)")
    return parser


def _add_etcd_tls(parser: argparse.ArgumentParser) -> None:
    """etcd's client TLS options, as etcdctl spells them (checked by EtcdClient before any connection)."""
    parser.add_argument("--cacert", help="CA bundle for https endpoints")
    parser.add_argument("--cert", help="client certificate (PEM)")
    parser.add_argument("--key", help="client certificate key (PEM)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not a positive whole number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text} is not a positive number")
    return value


def _add_reencrypt_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "reencrypt", help="rewrite stored objects through the Kubernetes API so kube-apiserver encrypts them with "
                          "the current key (an unchanged update: UIDs stay; never delete and re-create)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--encryption-config", type=Path, metavar="FILE",
                       help="every resource this EncryptionConfiguration names")
    which.add_argument("--resources", metavar="LIST", help="comma-separated: secrets,configmaps,widgets.example.com")
    parser.add_argument("--namespace", "-n", help="only this namespace (default: all)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else the "
                                             "pod's service account)")
    parser.add_argument("--context", help="kubeconfig context (default: its current-context)")
    parser.add_argument("--concurrency", type=_argument(_positive_int), default=4,
                        help="updates in flight at once (default: %(default)s)")
    parser.add_argument("--max-rate", type=_argument(_positive_float), metavar="PER_SECOND",
                        help="at most this many updates per second (default: no limit)")
    parser.add_argument("--page-size", type=_argument(_positive_int), default=100,
                        help="objects per list page / per batch (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be rewritten; write nothing")
    parser.add_argument("--state", type=Path, metavar="FILE",
                        help="without etcd: resume file recording each resource's last completed page; a run "
                             "started again with it continues there; removed when a run finishes")
    parser.add_argument("--timeout", type=_argument(_positive_float), default=30.0,
                        help="per-request deadline in seconds (default: %(default)s)")
    parser.add_argument("--etcd-endpoints", metavar="URLS",
                        help="etcd client URLs: touch only objects not on the primary key, end with the etcd scan "
                             "gate (read-only)")
    _add_etcd_tls(parser)
    parser.add_argument("--etcd-prefix", default="/registry/",
                        help="kube-apiserver's --etcd-prefix (default: %(default)s)")
    primary = parser.add_mutually_exclusive_group()
    primary.add_argument("--key-id", metavar="UUID", type=_argument(parse_key_uuid),
                         help="with --etcd-endpoints: the primary key UUID objects must end on")
    primary.add_argument("--socket", type=_argument(socket_path),
                         help="with --etcd-endpoints: ask this plugin's Status for the primary key UUID")


def _add_rotate_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rotate_parser = commands.add_parser("rotate", help="two-phase KEK rotation by editing this node's config file")
    steps = rotate_parser.add_subparsers(dest="rotate_command", required=True)
    stage = steps.add_parser("stage", help="LABEL joins the decrypt-only keys (phase 1, every node)")
    promote = steps.add_parser("promote", help="LABEL becomes Primary_key, the old primary decrypt-only (phase 2)")
    retire = steps.add_parser("retire", help="remove LABEL from Secondary_key once etcd proves nothing needs it")
    status = steps.add_parser("status", help="this node's config beside the running plugin's keyring")
    for step in (stage, promote, retire, status):
        step.add_argument("--config", type=Path, required=True, help="this node's plugin config file")
    for step in (stage, promote, retire):
        step.add_argument("label", metavar="LABEL", help="key label")
    stage.add_argument("--create", action="store_true", help="create the key in the HSM first")
    promote.add_argument("--one-step", action="store_true",
                         help="promote a key that is not staged (the vendor's swap; a single control-plane node only)")
    promote.add_argument("--require-staged-on", metavar="ENDPOINTS",
                         help="comma-separated plugin endpoints (http://HOST:PORT or sockets) that must decrypt "
                              "under LABEL before this node encrypts with it")
    retire.add_argument("--etcd-endpoints", help="etcd client URLs, comma-separated")
    _add_etcd_tls(retire)
    retire.add_argument("--prefix", default="/registry/", help="kube-apiserver's --etcd-prefix (default: %(default)s)")
    retire.add_argument("--resource", action="append", help="also check this resource (repeatable; every resource "
                                                            "holding KMS v2 objects is always checked)")
    retire.add_argument("--force", action="store_true", help="retire even when the scan does not pass (loses data)")
    status.add_argument("--endpoint", help="the plugin's http://HOST:PORT or socket (default: from the config)")
    for step in (promote, status):
        step.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                          help="per-call deadline in seconds (default: %(default)s)")


def _config(args: argparse.Namespace) -> PluginConfig:
    path = prepare_dev_environment(args.dev_dir) if args.dev else args.config
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    """Every line serve writes, fatal errors and tracebacks included, comes out in the configured format."""
    logger = build_logger(stated_log_format(args.config) if args.config else "text")
    try:
        config = _config(args)
        logger = build_logger(config.log_format, config.log_level)
        if args.dev:
            log_event(logger, logging.WARNING, "DEVELOPMENT MODE: private SoftHSM2 token with its PIN on disk; "
                      "not for production", directory=str(args.dev_dir.resolve()), config=str(config.path))
        plugin = Plugin(config, logger)
        install_signal_handlers(plugin)
        plugin.start()
        plugin.run_until_stopped()
        if plugin.failure is not None:  # stopped by itself, to be restarted (a wedged PKCS#11 library)
            return EXIT_FAILURE
    except (ConfigError, PinError) as exc:
        log_event(logger, logging.CRITICAL, "config error; not started", error=str(exc))
        return EXIT_USAGE
    except (HsmError, KeyringError, SocketInUse, FileNotFoundError) as exc:
        log_event(logger, logging.CRITICAL, "not started", error=str(exc))
        return EXIT_FAILURE
    except Exception:
        logger.critical("unexpected error; stopped", exc_info=True)
        return EXIT_FAILURE
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    new_uuid = create_key(_config(args), args.label)
    print(f"created key label={args.label} uuid={new_uuid}")
    return 0


def cmd_keys_adopt(args: argparse.Namespace) -> int:
    done = adopt(_config(args), args.label)
    replaced = f" (replaced CKA_ID {done.previous_cka_id})" if done.previous_cka_id else ""
    print(f"adopted key label={done.label} uuid={done.uuid}{replaced}\n"
          f"its fingerprint UUID {done.previous} stays a decrypt-only alias for data already stored under it; "
          "make HSM replicas and backups of this key only from now on")
    return 0


def cmd_keys_restrict(args: argparse.Namespace) -> int:
    done = restrict(_config(args), args.label)
    same = "uuid unchanged" if done.uuid_after == done.uuid_before else f"UUID CHANGED from {done.uuid_before}"
    print(f"key label={done.label} uuid={done.uuid_after} ({same})")
    for name in done.cleared:
        print(f"cleared {name}")
    for name, why in done.refused:
        print(f"NOT CLEARED {name}: the HSM refuses ({why}); rotate to a key made by p11kms keys create instead "
              "(p11kms rotate stage NEW --create, then promote and retire: docs/rotating-the-kek.md)")
    if not done.cleared and not done.refused:
        print("nothing to clear: CKA_WRAP and CKA_DERIVE are already false")
    return EXIT_FAILURE if done.refused else 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    print(f"{'LABEL':<24} {'UUID':<36} {'ROLE':<10} UUID_SOURCE")
    for row in list_keys(_config(args)):
        aliases = f" (decrypt-only aliases: {', '.join(row.aliases)})" if row.aliases else ""
        print(f"{row.label:<24} {row.uuid:<36} {row.role:<10} {row.uuid_source}{aliases}")
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
    if args.rewrite_commands and args.require is None:
        print("p11kms: --rewrite-commands only applies with --require UUID (the key objects must be on)",
              file=sys.stderr)
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
        labels = {row.uuid: row.label for row in list_keys(load_config(args.config))} if args.config else None
        print(render_text(report, labels))
        if gate is not None:
            print("\n".join(gate.lines))
        if gate is not None and args.rewrite_commands and not gate.passed:
            commands = rewrite_commands(gate, report.prefix)
            print("\nRewrite only these objects (kube-apiserver re-encrypts each on update; never --force):")
            print("\n".join(commands) if commands else "  none listed: nothing was checked")
    return gate.exit_code if gate is not None else 0


def cmd_rotate(args: argparse.Namespace) -> int:
    try:
        if args.rotate_command == "stage":
            outcome = rotate.stage(args.config, args.label, create=args.create)
        elif args.rotate_command == "promote":
            endpoints = [e for e in (args.require_staged_on or "").split(",") if e.strip()]
            outcome = rotate.promote(args.config, args.label, one_step=args.one_step, require_staged_on=endpoints,
                                     timeout=args.timeout)
        elif args.rotate_command == "retire":
            report = None
            if args.etcd_endpoints:
                client = EtcdClient(args.etcd_endpoints.split(","), cacert=args.cacert, cert=args.cert, key=args.key)
                report = scan(client, args.prefix, require=rotate.primary_uuid(args.config))
            outcome = rotate.retire(args.config, args.label, report, resources=set(args.resource or ()),
                                    force=args.force)
        else:
            outcome = rotate.status(args.config, args.endpoint, args.timeout)
    except rotate.RotateRefused as exc:
        print(f"p11kms: REFUSED: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except EtcdTlsOptionError as exc:
        print(f"p11kms: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(outcome.lines))
    return outcome.exit_code


def cmd_reencrypt(args: argparse.Namespace) -> int:
    from p11kms.ops import reencrypt  # the kubernetes client loads here only, never in `serve`

    def usage(message: str) -> int:
        print(f"p11kms reencrypt: {message}", file=sys.stderr)
        return EXIT_USAGE

    if args.etcd_endpoints is None:
        given = [o for o, v in (("--key-id", args.key_id), ("--socket", args.socket), ("--cacert", args.cacert),
                                ("--cert", args.cert), ("--key", args.key)) if v]
        if given:
            return usage(f"{', '.join(given)} only apply with --etcd-endpoints")
    elif args.key_id is None and args.socket is None:
        return usage("--etcd-endpoints needs the primary key UUID objects must end on: --key-id UUID, or "
                     "--socket PATH to ask the plugin")
    elif args.state is not None:
        return usage("--state only applies without --etcd-endpoints (with etcd a new run touches only what is "
                     "still off the key)")
    try:
        if args.encryption_config:
            names, in_clear = reencrypt.resources_from_encryption_config(args.encryption_config)
            if in_clear:
                print(f"reencrypt: left out {', '.join(in_clear)}: identity is their first provider, so "
                      "kube-apiserver writes them in clear (--resources rewrites them anyway)", file=sys.stderr)
        else:
            names = reencrypt.parse_resources(args.resources)
        etcd = None
        if args.etcd_endpoints:
            etcd = EtcdClient(args.etcd_endpoints.split(","), cacert=args.cacert, cert=args.cert, key=args.key)
        key_id = args.key_id
        if etcd is not None and key_id is None:
            with KmsClient(args.socket, DEFAULT_TIMEOUT) as kms:
                try:
                    key_id = kms.status().key_id
                except grpc.RpcError as exc:
                    print(f"p11kms reencrypt: Status failed: {kms.explain(exc)}", file=sys.stderr)
                    return EXIT_FAILURE
            print(f"primary key UUID {key_id} (Status of {args.socket})", file=sys.stderr)
        api = reencrypt.connect(args.kubeconfig, args.context, args.timeout)
        options = reencrypt.Options(names, args.namespace, args.concurrency, args.max_rate, args.page_size,
                                    args.dry_run, args.state, etcd, args.etcd_prefix, key_id)
        previous = {sig: signal.signal(sig, lambda *_: api.stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            outcome = reencrypt.run(api, options, sys.stderr, sys.stdout, sys.stderr.isatty())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except (reencrypt.UsageError, EtcdTlsOptionError) as exc:
        return usage(str(exc))
    except reencrypt.ApiFailure as exc:
        print(f"p11kms reencrypt: the API server refused: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(outcome.lines))
    return outcome.exit_code


def cmd_cluster(args: argparse.Namespace) -> int:
    verdict = cluster_status(args.endpoints.split(","), args.timeout)
    print("\n".join(verdict.lines))
    return verdict.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve,
        "status": cmd_status,
        "check": cmd_check,
        "doctor": cmd_doctor,
        "etcd": cmd_etcd_scan,
        "rotate": cmd_rotate,
        "cluster": cmd_cluster,
        "reencrypt": cmd_reencrypt,
        "keys": {"create": cmd_keys_create, "adopt": cmd_keys_adopt,
                 "restrict": cmd_keys_restrict}.get(getattr(args, "keys_command", ""), cmd_keys_list),
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
