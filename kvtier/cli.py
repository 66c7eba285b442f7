"""The ``kvtier`` command: check a config, inspect what a store holds, run the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from kvtier.storage_backends.redis_backend import mask_url
from kvtier.urls import redact_text

from . import __version__
from .config import ConfigError, DiskTier, RedisTier, load_config


def _check_config(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.file)
    table = Table(title=f"kvtier config {args.file}: OK", show_lines=False)
    for column in ("tier", "type", "where", "cap / ttl"):
        table.add_column(column)
    for tier in config.tiers:
        if isinstance(tier, DiskTier):
            where, cap = tier.path, f"{tier.max_bytes / 2**30:.2f} GiB"
        elif isinstance(tier, RedisTier):
            where, cap = mask_url(tier.url), f"ttl {tier.ttl_seconds or 'none'}"
        else:
            where, cap = "host memory", f"{tier.max_bytes / 2**30:.2f} GiB"
        table.add_row(tier.name, tier.type, where, cap)
    console.print(table)
    console.print(f"chunk_size={config.chunk_size} write_policy={config.write_policy} "
                  f"namespace={config.namespace!r} metrics_port={config.metrics.port}")
    from kvtier.connector.integrity import load_integrity_key

    key = load_integrity_key(config)  # a bad key file or variable is a ConfigError, as at start-up
    console.print(f"integrity key: {key.source + ' (read, ok)' if key else 'none (chunks are checksummed, not MACed)'}")
    return 0


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from kvtier.storage_backends.disk_backend import summarize_disk
    from kvtier.storage_backends.redis_backend import summarize_redis

    targets = [("disk", p) for p in args.disk] + [("redis", u) for u in args.redis]
    if not targets:
        config = load_config(args.config)
        for tier in config.tiers:
            if isinstance(tier, DiskTier):
                targets.append(("disk", tier.path))
            elif isinstance(tier, RedisTier):
                targets.append(("redis", tier.url))
    if not targets:
        console.print("nothing to inspect: the config has no disk or redis tier")
        return 1
    table = Table(title="kvtier stores")
    for column in ("store", "chunks", "bytes", "unreadable", "models", "layouts"):
        table.add_column(column)
    for kind, where in targets:
        summary = summarize_disk(where) if kind == "disk" else summarize_redis(where, args.prefix)
        table.add_row(
            f"{kind} {mask_url(where)}", str(summary.chunks), f"{summary.bytes / 2**20:.1f} MiB",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier: tiered KV-cache storage for LLM engines")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a YAML config (with KVTIER_* overrides) and show the tiers")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    inspect = sub.add_parser("inspect", help="what a disk folder or Redis namespace holds")
    inspect.add_argument("--disk", action="append", default=[], metavar="PATH")
    inspect.add_argument("--redis", action="append", default=[], metavar="URL")
    inspect.add_argument("--prefix", default="kvtier:", help="Redis key prefix (default kvtier:)")
    inspect.add_argument("--config", help="inspect the disk and redis tiers of this config (default: $KVTIER_CONFIG or built-in)")
    inspect.set_defaults(func=_inspect)
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
