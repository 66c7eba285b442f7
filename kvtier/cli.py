"""The ``kvtier`` command: check a config, inspect what a store holds, run the node server or the demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

from rich.console import Console
from rich.table import Table

from kvtier.connector.config import ConfigError, load_config
from kvtier.storage_backends.redis_common import mask_url, redact_text
from kvtier.storage_backends.registry import tier_type
from kvtier.storage_backends.summary import StoreSummary

from . import __version__


def _check_config(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.file)
    table = Table(title=f"kvtier config {args.file}: OK", show_lines=False)
    for column in ("tier", "type", "where", "cap / ttl"):
        table.add_column(column)
    for tier in config.tiers:
        describe = tier_type(tier.type).describe  # each tier type says what it is; a plug-in may not
        where, cap = describe(tier) if describe is not None else ("-", "-")
        table.add_row(tier.name, tier.type, where, cap)
    console.print(table)
    console.print(f"chunk_size={config.chunk_size} write_policy={config.write_policy} "
                  f"namespace={config.namespace!r} metrics_port={config.metrics.port}")
    from kvtier.connector.integrity_key import load_integrity_key

    key = load_integrity_key(config)  # a bad key file or variable is a ConfigError, as at start-up
    console.print(f"integrity key: {key.source + ' (read, ok)' if key else 'none (chunks are checksummed, not MACed)'}")
    return 0


def _inspect(args: argparse.Namespace, console: Console) -> int:
    """``--disk`` / ``--redis`` name stores directly; else every tier of the config whose type can
    summarize what it holds (the persistent ones), read with that tier's own settings."""
    from kvtier.storage_backends.disk_backend import summarize_disk
    from kvtier.storage_backends.redis_backend import summarize_redis

    targets: list[tuple[str, Callable[[], StoreSummary]]] = []
    for path in args.disk:
        targets.append((f"disk {mask_url(path)}", partial(summarize_disk, path)))
    for url in args.redis:
        targets.append((f"redis {mask_url(url)}", partial(summarize_redis, url, args.prefix)))
    if not targets:
        config = load_config(args.config)
        for tier in config.tiers:
            kind = tier_type(tier.type)
            if kind.summarize is None:
                continue
            where = kind.describe(tier)[0] if kind.describe is not None else tier.name
            targets.append((f"{tier.type} {mask_url(where)}", partial(kind.summarize, tier)))
    if not targets:
        console.print("nothing to inspect: the config has no tier that keeps chunks outside the process "
                      "(disk, redis, ...)")
        return 1
    table = Table(title="kvtier stores")
    for column in ("store", "chunks", "bytes", "unreadable", "models", "layouts"):
        table.add_column(column)
    for label, summarize in targets:
        summary = summarize()
        table.add_row(
            label, str(summary.chunks), f"{summary.bytes / 2**20:.1f} MiB",
            str(summary.unreadable),
            ", ".join(f"{m} ({n})" for m, n in summary.models.most_common()) or "-",
            ", ".join(f"{m} ({n})" for m, n in summary.layouts.most_common()) or "-",
        )
    console.print(table)
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    if args.tiers_only:
        from .demo import run_demo

        return run_demo(console, config_path=args.config)
    from .vllm_demo import run_engine_demo

    return run_engine_demo(console, config_path=args.config)


def _size_option(option: str, value: str) -> int:
    from kvtier.storage_backends.tier_spec import parse_byte_size

    try:
        size = parse_byte_size(value)
    except ValueError:
        raise ValueError(f"{option} {value!r}: must be a byte size like 4GiB, 512MB or an integer") from None
    if size <= 0:
        raise ValueError(f"{option} {value!r}: must be positive")
    return size


def _server(args: argparse.Namespace, console: Console) -> int:
    """The node server in the foreground; one ready line on stdout, logs on stderr."""
    import logging

    from kvtier.storage_backends.node_server import ServerOptions, run_server

    try:
        lease_timeout_s = float(args.lease_timeout_s)
    except ValueError:
        raise ValueError(f"--lease-timeout-s {args.lease_timeout_s!r}: must be a number of seconds") from None
    options = ServerOptions(
        socket_path=os.path.expanduser(os.path.expandvars(args.socket)),
        max_bytes=_size_option("--max-bytes", args.max_bytes),
        slot_bytes=_size_option("--slot-bytes", args.slot_bytes),
        lease_timeout_s=lease_timeout_s,
    )
    options.check()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(line: str) -> None:
        print(line, flush=True)

    run_server(options, on_ready=ready)
    return 0


def _add_server_parser(sub: argparse._SubParsersAction) -> None:
    from kvtier.storage_backends.node_protocol import default_socket_path

    server = sub.add_parser(
        "server", help="one host-memory cache per node, shared by every engine process on it (the 'node' tier)",
        description="Run the node cache server in the foreground until SIGTERM or SIGINT. It keeps chunks in "
                    "shared memory under /dev/shm (allocated at start, freed at exit) and answers the 'node' "
                    "tier of every engine process of this user on this machine.")
    server.add_argument("--socket", default=default_socket_path(), metavar="PATH",
                        help="Unix socket to listen on (folder made 0700, socket 0600); refused while another "
                             "server answers there (default: %(default)s, i.e. $XDG_RUNTIME_DIR/kvtier/node.sock "
                             "or ~/.cache/kvtier/run/node.sock)")
    server.add_argument("--max-bytes", default="4GiB", metavar="SIZE",
                        help="shared memory to hold chunks in, allocated at start; LRU eviction within it "
                             "(4GiB, 512MB, ...; default %(default)s)")
    server.add_argument("--slot-bytes", default="1MiB", metavar="SIZE",
                        help="slot size: a chunk takes ceil(size / slot) slots (default %(default)s)")
    server.add_argument("--lease-timeout-s", default="30", metavar="S",
                        help="longest time a client that reads by copying may hold a read lease before it "
                             "is reclaimed; what a connection reads in place or is writing is freed when "
                             "it closes (default %(default)s)")
    server.set_defaults(func=_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier: tiered KV-cache storage for LLM engines")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a YAML config (with KVTIER_* overrides) and show the tiers")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    inspect = sub.add_parser("inspect", help="what a disk folder or Redis namespace holds")
    inspect.add_argument("--disk", action="append", default=[], metavar="PATH")
    inspect.add_argument("--redis", action="append", default=[], metavar="URL")
    inspect.add_argument("--prefix", default="kvtier:", help="key prefix of the --redis URLs (default kvtier:)")
    inspect.add_argument("--config", help="inspect the persistent tiers (disk, redis, plug-ins) of this config, each "
                                          "with its own settings (default: $KVTIER_CONFIG or built-in)")
    inspect.set_defaults(func=_inspect)
    _add_server_parser(sub)
    demo = sub.add_parser("demo", help="a vLLM engine on CPU: the cache hit and the TTFT it saves")
    demo.add_argument("--config", help="YAML config (default: $KVTIER_CONFIG or the built-in cpu + disk tiers)")
    demo.add_argument("--tiers-only", action="store_true", help="no engine: store a synthetic KV cache and load it back")
    demo.set_defaults(func=_demo)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda args, console: console.print(f"kvtier {__version__}") or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, Console())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ConnectionError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a --redis URL that is not host:port; masked, as every URL we print
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
