"""The `router` command: its parser, `serve`, `check-config`, `explain` and `flags set`.

The other command groups live in their own modules (COMMAND_MODULES), each adding its
commands with `register(sub)`; what they share is in router/cli/common.py.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router import __version__
from router.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    config_path,
    config_tree,
    settings_from,
    with_config,
)
from router.domain import (
    DEFAULT_FLAG_VALUE,
    DEFAULT_TENANT_ID_MAX_LENGTH,
    FLAG_VALUES,
    is_tenant_id,
)
from router.service.native import BuildState, StaleBuild, build_state, check_fresh
from router.settings import ConfigError, Settings, deprecated_keys

DESCRIPTION = """\
Route each tenant's requests to the legacy or the new backend by its routing flag, and
move tenants from legacy to new safely."""

EPILOG = """\
a tenant's move to new, step by step:
  router explain TENANT                 where its requests go now, and why
  router shadow report TENANT           does new answer as legacy does?
  router cutover TENANT ...             hold, drain, flip to new, verify (or roll back)
  router migrate --tenants FILE ...     the same for every tenant of a file, resumably
  router tenants rollback TENANT ...    undo the ratchet (data written on new stays there)

Each command has its own --help. Settings come from --config, else $ROUTER_CONFIG, else
config/router.yaml; secrets only from the environment, never from arguments.
Exit status: 0 done, 1 the command failed, 2 bad usage or configuration (nothing done),
130 interrupted (cutover, migrate)."""

# The command groups beyond serve, check-config, explain and flags, one module each, each
# with `register(sub)`. Every one must import: a missing one is a broken install, and fails
# loudly rather than leaving its commands silently absent from `router --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "router.cli.shadow",  # router shadow ...: the shadow traffic report
    "router.cli.cutover",  # router cutover, router migrate
    "router.cli.tenants",  # router tenants ...: the ratchet ledger
    "router.cli.sign",  # router sign: signed test overrides
)


def cmd_serve(args: argparse.Namespace) -> int:
    from router.service.server import run

    return run(settings_from(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = settings_from(args)
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
    print(f"config ok: {config_path(args) or '(environment only)'}")
    print(
        f"  listen {settings.server.listen}, admin {settings.server.admin_listen},"
        f" workers {settings.server.workers}"
    )
    print(f"  legacy {settings.upstreams.legacy.url}, new {settings.upstreams.new.url}")
    source = settings.flags.file if settings.flags.source == "file" else "LaunchDarkly"
    print(f"  flag {settings.flags.flag_key!r} from {source}")
    for key in deprecated_keys(config_tree(args) or {}):
        print(f"  deprecated key, still read: {key}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    settings = settings_from(args)
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

    if not is_tenant_id(tenant, settings.tenant.max_length):
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
            "flag_value": flags.variation(tenant, DEFAULT_FLAG_VALUE),
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
    max_length = DEFAULT_TENANT_ID_MAX_LENGTH
    if path is None or args.config is not None:
        settings = settings_from(args)
        # The ids the router routes: `flags set` accepts exactly those.
        max_length = settings.tenant.max_length
        if path is None:
            if settings.flags.file is None:
                raise ConfigError("flags.file: no flag file configured; pass --file")
            path = settings.flags.file
        # The flag the router reads (flags.flag_key), not always "tenant-routing": with
        # another key configured, `flags set` wrote a flag the router never evaluates.
        flag_key = flag_key or settings.flags.flag_key
    try:
        previous = set_tenant(
            Path(path),
            args.tenant,
            args.value,
            flag_key=flag_key or DEFAULT_FLAG_KEY,
            tenant_max_length=max_length,
        )
    except FlagFileError as exc:
        print(f"router flags set: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if previous == args.value:
        print(f"{args.tenant}: already {args.value} ({path} unchanged)")
    else:
        print(f"{args.tenant}: {previous} -> {args.value} ({path})")
    return 0


def version_line(build: BuildState) -> str:
    """`router --version`: the package version and what runs (compiled or pure Python)."""
    return f"router {__version__} ({build.describe})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(build_state()),
        help="print the version and the build (compiled or pure Python)",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="command")

    serve = with_config(
        sub.add_parser(
            "serve",
            help="run the router: the proxy port and the admin port",
        )
    )
    serve.add_argument("--workers", type=int, help="worker processes (SO_REUSEPORT)")
    serve.set_defaults(func=cmd_serve)

    check = with_config(
        sub.add_parser(
            "check-config",
            help="validate a config and its flag file as serve would, then exit",
        )
    )
    check.set_defaults(func=cmd_check_config)

    explain = with_config(sub.add_parser("explain", help="where TENANT's requests go now, and why"))
    explain.add_argument("tenant")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=cmd_explain)

    flags = sub.add_parser(
        "flags",
        help="set a tenant's routing flag in the local flag file",
        description="The routing flag in the local flag file (flags.source: file). With "
        "LaunchDarkly, change the flag there, or use `router cutover` to move a tenant.",
    )
    flags_sub = flags.add_subparsers(dest="flags_command", required=True)
    flags_set = with_config(
        flags_sub.add_parser("set", help="send TENANT's requests to legacy or new, or hold them")
    )
    flags_set.add_argument("tenant")
    flags_set.add_argument("value", choices=FLAG_VALUES)
    flags_set.add_argument(
        "--file", type=Path, help="flag file (default: flags.file of the config)"
    )
    flags_set.add_argument(
        "--flag-key",
        help="flag to edit (default: the config's flags.flag_key when the config is read,"
        " i.e. without --file or with --config; else tenant-routing)",
    )
    flags_set.set_defaults(func=cmd_flags_set)

    # Imported only once main() has checked the build: a stale compiled hot path is
    # refused before any command's module can import it.
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        check_fresh()  # before build_parser(): it imports the commands' modules
    except StaleBuild as exc:
        print(f"router: {exc}", file=sys.stderr)
        return EXIT_FAILED
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"router: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    return code
