"""Command line: argv -> settings -> the command. Nothing else lives here.

    router serve [--config FILE] [--workers N]
    router check-config [--config FILE]
    router explain TENANT [--config FILE] [--json]
    router flags set TENANT legacy|hold|new [--file F] [--flag-key KEY]

Exit status: 0 ok, 1 the command failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.service.native import StaleBuild, check_fresh
from router.settings import ConfigError, Settings, load_settings

DEFAULT_CONFIG = "config/router.yaml"
EXIT_CONFIG = 2


def _config_path(args: argparse.Namespace) -> str | None:
    """--config, else ROUTER_CONFIG, else config/router.yaml when it exists, else env only."""
    if args.config:
        return str(args.config)
    from_env = os.environ.get("ROUTER_CONFIG")
    if from_env:
        return from_env
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def _load(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    # `is not None`, not truthiness: `--workers 0` must be rejected (exit 2), not silently
    # replaced by the configured value.
    if getattr(args, "workers", None) is not None:
        env["ROUTER_WORKERS"] = str(args.workers)
    return load_settings(_config_path(args), env)


def cmd_serve(args: argparse.Namespace) -> int:
    from router.service.server import run

    return run(_load(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    problems = []
    if settings.flags.source == "file" and settings.flags.file is not None:
        from router.control.flagfile import FlagFileError, read_flag_file

        try:
            data = read_flag_file(settings.flags.file)
            if settings.flags.flag_key not in data.get("flags", {}):
                problems.append(
                    f"flags.file: flag {settings.flags.flag_key!r} not in {settings.flags.file}"
                )
        except FlagFileError as exc:
            problems.append(f"flags.file: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))
    print(f"config ok: {_config_path(args) or '(environment only)'}")
    print(
        f"  listen {settings.server.listen}, admin {settings.server.admin_listen},"
        f" workers {settings.server.workers}"
    )
    print(f"  legacy {settings.upstreams.legacy.url}, new {settings.upstreams.new.url}")
    source = settings.flags.file if settings.flags.source == "file" else "LaunchDarkly"
    print(f"  flag {settings.flags.flag_key!r} from {source}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    settings = _load(args)
    result = asyncio.run(_explain(settings, args.tenant))
    if args.json:
        print(json.dumps(result, indent=2))
    elif "error" in result:
        print(f"tenant {args.tenant!r}: {result['error']}", file=sys.stderr)
    else:
        print(f"tenant    {result['tenant']}")
        print(f"target    {result['target']}  (reason: {result['reason']})")
        print(f"upstream  {result['upstream']}  (Host: {result['host_header']})")
        print(
            f"flag      {result['flag_key']} = {result['flag_value']!r}"
            f"  (source: {result['flag_source']})"
        )
        ledgered = "yes: new for good" if result["ledgered"] else "no"
        print(f"ledgered  {ledgered}  ({result['ledger']})")
        if result["shadow_rate"]:
            print(f"shadow    {result['shadow_rate']:.2%} of GET/HEAD requests copied to new")
    return 1 if "error" in result else 0


async def _explain(settings: Settings, tenant: str) -> dict[str, Any]:
    from router.control.flags import FlagSource
    from router.control.ledger import LedgerError, open_ledger
    from router.proxy.decide import Decider, LedgerView
    from router.proxy.identify import TenantIdentifier

    if not TenantIdentifier(settings.tenant).is_valid(tenant):
        return {"tenant": tenant, "error": "not a valid tenant id"}
    loop = asyncio.get_running_loop()
    flags = FlagSource(settings.flags, loop)
    ledger = LedgerView(open_ledger(settings.ledger), loop)
    try:
        try:
            await ledger.start()  # the ratchet: a ledgered tenant stays on new
        except LedgerError as exc:
            return {"tenant": tenant, "error": f"ratchet ledger unavailable: {exc}"}
        await flags.start(wait=max(settings.flags.start_wait, 1.0))
        if not flags.ready:
            return {"tenant": tenant, "error": "flag data could not be loaded"}
        from router.proxy.shadow import ShadowPolicy

        shadow = ShadowPolicy(settings.shadow, flags.evaluate) if settings.shadow.enabled else None
        decider = Decider(settings, flags, ledger, shadow_rate=shadow.rate if shadow else None)
        route = decider.evaluate(tenant)
        upstream = getattr(settings.upstreams, route.side, settings.upstreams.legacy)
        source = str(settings.flags.file) if settings.flags.source == "file" else "launchdarkly"
        return {
            "tenant": tenant,
            "target": route.side,
            "reason": route.reason,
            "upstream": upstream.url,
            "host_header": upstream.host_header,
            "flag_key": settings.flags.flag_key,
            "flag_value": flags.variation(tenant, "legacy"),
            "flag_source": source,
            "ledgered": tenant in ledger.tenants,
            "ledger": ledger.ledger.url if ledger.ledger is not None else None,
            # Fraction of its GET/HEAD requests copied to new for comparison (shadow.py).
            "shadow_rate": route.shadow_rate,
        }
    finally:
        await flags.close()
        await ledger.close()


def cmd_flags_set(args: argparse.Namespace) -> int:
    from router.control.flagfile import DEFAULT_FLAG_KEY, FlagFileError, set_tenant

    path = args.file
    flag_key = args.flag_key
    if path is None or args.config is not None:
        settings = _load(args)
        if path is None:
            if settings.flags.file is None:
                raise ConfigError("flags.file: no flag file configured; pass --file")
            path = settings.flags.file
        # The flag the router reads (flags.flag_key), not always "tenant-routing": with
        # another key configured, `flags set` wrote a flag the router never evaluates.
        flag_key = flag_key or settings.flags.flag_key
    try:
        previous = set_tenant(
            Path(path), args.tenant, args.value, flag_key=flag_key or DEFAULT_FLAG_KEY
        )
    except FlagFileError as exc:
        print(f"router flags set: {exc}", file=sys.stderr)
        return 1
    if previous == args.value:
        print(f"{args.tenant}: already {args.value} ({path} unchanged)")
    else:
        print(f"{args.tenant}: {previous} -> {args.value} ({path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="router", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help=f"YAML settings (default {DEFAULT_CONFIG})")
        return p

    serve = with_config(sub.add_parser("serve", help="run the proxy and its admin port"))
    serve.add_argument("--workers", type=int, help="worker processes (SO_REUSEPORT)")
    serve.set_defaults(func=cmd_serve)

    check = with_config(sub.add_parser("check-config", help="validate settings and exit"))
    check.set_defaults(func=cmd_check_config)

    explain = with_config(sub.add_parser("explain", help="where would TENANT be routed, and why"))
    explain.add_argument("tenant")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=cmd_explain)

    flags = sub.add_parser("flags", help="edit the flag file")
    flags_sub = flags.add_subparsers(dest="flags_command", required=True)
    flags_set = with_config(flags_sub.add_parser("set", help="route TENANT to a side"))
    flags_set.add_argument("tenant")
    flags_set.add_argument("value", choices=["legacy", "hold", "new"])
    flags_set.add_argument(
        "--file", type=Path, help="flag file (default: flags.file of the config)"
    )
    flags_set.add_argument(
        "--flag-key",
        help="flag to edit (default: the config's flags.flag_key when the config is read,"
        " i.e. without --file or with --config; else tenant-routing)",
    )
    flags_set.set_defaults(func=cmd_flags_set)

    # Larger command families live in their own modules, each with
    # `register(sub, with_config)`; imported lazily so `router serve` loads none of them.
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(sub, with_config)
    return parser


# router tenants ... (ledger), router sign (test routing), router cutover / migrate,
# router shadow ... (shadow traffic report, reset).
COMMAND_MODULES: tuple[str, ...] = tuple(
    name
    for name in (
        "router.cli.tenants",
        "router.cli.sign",
        "router.cli.cutover",
        "router.cli.shadow",
    )
    if importlib.util.find_spec(name) is not None
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        check_fresh()  # before build_parser(): it imports the commands' modules
    except StaleBuild as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"router: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    return code
