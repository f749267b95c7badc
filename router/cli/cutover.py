"""`router cutover` and `router migrate`: the SRE's tools to move tenants to new.

    router cutover TENANT (--flags-file F | --ld-project P --ld-environment E)
                   --admin URL [--admin URL ...] [--json] [--drain-timeout S]
                   [--replication-check CMD_OR_URL] [--max-lag S] [--resume-hold]
                   [--require-shadow-match R [--min-samples N]]
    router migrate --tenants FILE (--flags-file F | --ld-project P --ld-environment E)
                   --admin URL [--admin URL ...] [--concurrency N] [--rate PER_MIN]
                   [--journal PATH] [--wave-size N] [--dry-run]
                   [--require-shadow-match R [--min-samples N]]

--require-shadow-match R (0 < R <= 1, e.g. 0.999) gates each tenant on shadow traffic: the
preflight refuses (nothing changed) unless the routers compared at least --min-samples of
its requests (default 100, summed over every --admin router) and matched/compared >= R.
`router shadow report TENANT` shows the figures. A tenant already on new is not gated.

Secrets come from the environment, never from arguments (argv is visible to every user of
the machine): ROUTER_ADMIN_TOKEN (the routers' admin token), LAUNCHDARKLY_API_TOKEN (a
LaunchDarkly REST API access token, with --ld-*). The flag key is --flag-key, else the
config's flags.flag_key (--config, ROUTER_CONFIG or config/router.yaml), else
tenant-routing. Tenant ids are checked against the config's tenant.max_length (default
128), so these tools accept exactly the ids the routers route.

Exit status: 0 done (moved, or already on new), 1 failed (rolled back, refused or stuck),
2 usage or configuration, 130 migrate interrupted (SIGINT; the journal makes a rerun resume).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from router.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    admin_token,
    admin_urls,
    config_section,
    config_tree,
    count,
    fraction,
    marks,
    non_negative,
    positive,
    reporting_usage_errors,
    tenant_max_length,
    with_config,
)
from router.control.cutover import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_LAG,
    DEFAULT_REPLICATION_TIMEOUT,
    DEFAULT_SHADOW_MIN_SAMPLES,
    DEFAULT_VERIFY_TIMEOUT,
    CutoverResult,
    Step,
    cutover,
)
from router.control.flagfile import DEFAULT_FLAG_KEY
from router.control.flagwriters import (
    LD_BASE_URL,
    FileFlagWriter,
    FlagWriterError,
    LaunchDarklyFlagWriter,
)
from router.control.migrate import (
    DEFAULT_CONCURRENCY,
    DEFAULT_WAVE_SIZE,
    Entry,
    Journal,
    MigrateError,
    Migration,
    Progress,
    Summary,
    dry_run,
    read_tenants,
    step_line,
)

OUTCOMES = {
    "moved": "moved",
    "already-new": "already on new",
    "refused": "refused (nothing changed)",
    "rolled-back": "rolled back to legacy",
    "stuck": "STUCK",
}

Writer = FileFlagWriter | LaunchDarklyFlagWriter


# ---- shared options ---------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    source = p.add_argument_group("flag (one of)")
    source.add_argument("--flags-file", type=Path, help="the routers' flag file")
    source.add_argument("--ld-project", help="LaunchDarkly project key (token: env)")
    source.add_argument("--ld-environment", help="LaunchDarkly environment key")
    source.add_argument(
        "--ld-base-url",
        default=LD_BASE_URL,
        help=f"LaunchDarkly API base URL (default {LD_BASE_URL})",
    )
    p.add_argument(
        "--flag-key", help="routing flag key (default: the config's flags.flag_key, else "
        f"{DEFAULT_FLAG_KEY})"
    )  # fmt: skip
    p.add_argument(
        "--admin",
        action="append",
        required=True,
        metavar="URL",
        help="a router's admin URL (http://host:8081); repeat for every router instance",
    )
    p.add_argument(
        "--drain-timeout",
        type=positive,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="S",
        help="longest wait for legacy requests in flight to finish "
        f"(default {DEFAULT_DRAIN_TIMEOUT:g}; keep it below the routers' hold_timeout)",
    )
    p.add_argument(
        "--verify-timeout",
        type=positive,
        default=DEFAULT_VERIFY_TIMEOUT,
        metavar="S",
        help=f"longest wait for every router to see a flag change (default "
        f"{DEFAULT_VERIFY_TIMEOUT:g})",
    )
    p.add_argument(
        "--replication-check",
        metavar="CMD_OR_URL",
        help="http(s) URL answering {caught_up: bool} or {lag_seconds: x} ({tenant} is "
        "replaced), or a shell command (TENANT in its environment; exit 0 = caught up)",
    )
    p.add_argument(
        "--max-lag",
        type=non_negative,
        default=DEFAULT_MAX_LAG,
        metavar="S",
        help=f"preflight: highest acceptable lag_seconds (default {DEFAULT_MAX_LAG:g}); after "
        "the drain the lag must not reach back before the drain",
    )
    p.add_argument(
        "--replication-timeout",
        type=positive,
        default=DEFAULT_REPLICATION_TIMEOUT,
        metavar="S",
        help=f"longest wait for replication to catch up after the drain, the tenant held "
        f"(default {DEFAULT_REPLICATION_TIMEOUT:g})",
    )
    p.add_argument(
        "--poll",
        type=positive,
        default=0.05,
        metavar="S",
        help="interval between polls of the routers (default 0.05)",
    )
    gate = p.add_argument_group("shadow gate (router shadow report TENANT shows the figures)")
    gate.add_argument(
        "--require-shadow-match",
        type=fraction,
        metavar="R",
        help="refuse to cut a tenant over (nothing changed) unless its shadow match rate, "
        "summed over every router, is at least R (0 < R <= 1, e.g. 0.999)",
    )
    gate.add_argument(
        "--min-samples",
        type=count,
        metavar="N",
        help="with --require-shadow-match: refuse unless at least N shadow comparisons "
        f"(default {DEFAULT_SHADOW_MIN_SAMPLES})",
    )


def _flag_key(args: argparse.Namespace, tree: dict[str, Any] | None) -> str:
    """--flag-key, else flags.flag_key of the config file, else tenant-routing."""
    if args.flag_key:
        return str(args.flag_key)
    key = config_section(tree, "flags").get("flag_key")
    if key is not None and (not isinstance(key, str) or not key):
        raise UsageError("the config's flags.flag_key must be a non-empty string")
    return key or DEFAULT_FLAG_KEY


def _writer(args: argparse.Namespace, tree: dict[str, Any] | None) -> Writer:
    """The flag the routers read, where --flags-file or --ld-* says; tenant ids checked
    against the config's tenant.max_length, as the routers check them."""
    flag_key = _flag_key(args, tree)
    max_length = tenant_max_length(tree)
    ld = args.ld_project is not None or args.ld_environment is not None
    if args.flags_file is not None and ld:
        raise UsageError("give either --flags-file or --ld-project/--ld-environment, not both")
    if args.flags_file is not None:
        if not args.flags_file.is_file():
            raise UsageError(f"--flags-file {args.flags_file}: no such file")
        return FileFlagWriter(args.flags_file, flag_key, tenant_max_length=max_length)
    if not ld:
        raise UsageError(
            "say where the flag is: --flags-file F, or --ld-project P --ld-environment E"
        )
    if not (args.ld_project and args.ld_environment):
        raise UsageError("--ld-project and --ld-environment go together")
    token = os.environ.get("LAUNCHDARKLY_API_TOKEN", "")
    if not token:
        raise UsageError(
            "LAUNCHDARKLY_API_TOKEN is not set (a LaunchDarkly REST API access token; it is "
            "never taken as an argument)"
        )
    parts = urlsplit(args.ld_base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--ld-base-url must be an http(s) URL, got {args.ld_base_url!r}")
    return LaunchDarklyFlagWriter(
        token,
        args.ld_project,
        args.ld_environment,
        flag_key,
        base_url=args.ld_base_url,
        tenant_max_length=max_length,
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """cutover()'s keyword options; a UsageError for a bad combination (call it before
    anything happens)."""
    if args.min_samples is not None and args.require_shadow_match is None:
        raise UsageError(
            "--min-samples only applies with --require-shadow-match R (the shadow gate)"
        )
    options: dict[str, Any] = {
        "drain_timeout": args.drain_timeout,
        "poll": args.poll,
        "replication_check": args.replication_check,
        "replication_timeout": args.replication_timeout,
        "max_lag": args.max_lag,
        "verify_timeout": args.verify_timeout,
    }
    if args.require_shadow_match is not None:
        options["shadow_match"] = args.require_shadow_match
        options["shadow_min_samples"] = args.min_samples or DEFAULT_SHADOW_MIN_SAMPLES
    return options


# ---- router cutover ---------------------------------------------------------------------


def cmd_cutover(args: argparse.Namespace) -> int:
    _options(args)  # a bad combination: exit 2 before anything happens
    writer = _writer(args, config_tree(args))
    admins = admin_urls(args.admin)
    token = admin_token()
    return asyncio.run(_cutover(args, writer, admins, token))


async def _cutover(args: argparse.Namespace, writer: Writer, admins: list[str], token: str) -> int:
    out = sys.stdout
    check, cross = marks(out)

    def on_step(step: Step) -> None:
        if not args.json:
            print(step_line(step, check, cross), file=out, flush=True)

    if not args.json:
        print(
            f"cutover {args.tenant}: {writer.describe()}, {len(admins)} router(s)",
            file=out,
            flush=True,
        )
    # Ctrl-C must not leave the tenant in hold: before the flag says new the cutover rolls
    # back; after, it finishes (going back is no longer safe).
    abort = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted(signum: int) -> None:
        print(
            f"router cutover: {signal.Signals(signum).name}: stopping safely (rolls back "
            "to legacy before the flag says new; finishes after)",
            file=sys.stderr,
            flush=True,
        )
        abort.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted, signum)
    try:
        result = await cutover(
            args.tenant,
            writer,
            admins,
            token,
            resume_hold=args.resume_hold,
            on_step=on_step,
            abort=abort,
            **_options(args),
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await writer.aclose()
    if args.json:
        print(json.dumps(result.to_json(), indent=2), file=out)
    else:
        print(_result_line(result, check, cross), file=out)
        if result.advice:
            print(f"  next: {result.advice}", file=out)
    if abort.is_set() and not result.ok:
        return EXIT_INTERRUPTED
    return result.exit_code


def _result_line(result: CutoverResult, check: str, cross: str) -> str:
    ms = f"{result.total_ms:.0f} ms"
    if result.outcome == "moved":
        return f"{check} {result.tenant} moved to new in {ms}"
    if result.outcome == "already-new":
        return f"{check} {result.tenant} already on new: nothing changed ({ms})"
    if result.outcome == "rolled-back":
        return f"{cross} {result.tenant} rolled back to legacy after {ms}: {result.reason}"
    if result.outcome == "refused":
        return f"{cross} {result.tenant} not cut over (nothing changed): {result.reason}"
    return f"{cross} {result.tenant} STUCK (flag {result.flag}) after {ms}: {result.reason}"


# ---- router migrate ---------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    _options(args)  # a bad combination: exit 2 before anything happens
    tree = config_tree(args)
    entries, warnings = read_tenants(args.tenants, tenant_max_length(tree))
    journal_path = args.journal or Path(f"{args.tenants}.journal")
    states, journal_warnings = Journal.load(journal_path)
    for warning in warnings + journal_warnings:
        print(f"router migrate: warning: {warning}", file=sys.stderr)
    writer = _writer(args, tree)
    admins = admin_urls(args.admin)
    token = admin_token()
    if args.dry_run:
        return asyncio.run(_dry_run(entries, writer, admins, token, states, args.wave_size))
    return asyncio.run(_migrate(args, entries, writer, admins, token, states, journal_path))


async def _dry_run(
    entries: list[Entry],
    writer: Writer,
    admins: list[str],
    token: str,
    states: dict[str, dict[str, Any]],
    wave_size: int,
) -> int:
    try:
        return await dry_run(entries, writer, admins, token, states, wave_size, sys.stdout)
    finally:
        await writer.aclose()


async def _migrate(
    args: argparse.Namespace,
    entries: list[Entry],
    writer: Writer,
    admins: list[str],
    token: str,
    states: dict[str, dict[str, Any]],
    journal_path: Path,
) -> int:
    out, err = sys.stdout, sys.stderr
    check, cross = marks(out)
    journal = Journal(journal_path)
    journal.open()
    progress = Progress(
        len(entries),
        err,
        tty=err.isatty(),
        window=args.eta_window,
        interval=args.progress_interval,
    )

    def on_result(entry: Entry, result: CutoverResult) -> None:
        mark = check if result.ok else cross
        outcome = OUTCOMES.get(result.outcome, result.outcome)
        text = f"{mark} {entry.tenant}: {outcome} in {result.total_ms:.0f} ms" + (
            f": {result.reason}" if result.reason else ""
        )
        print(text, file=out, flush=True)

    migration = Migration(
        entries,
        writer,
        admins,
        token,
        journal,
        concurrency=args.concurrency,
        rate=args.rate,
        wave_size=args.wave_size,
        max_failures=args.max_failures,
        cutover_options=_options(args),
        progress=progress,
        on_result=on_result,
    )
    loop = asyncio.get_running_loop()

    def interrupted(signum: int) -> None:
        name = signal.Signals(signum).name
        running = progress.running
        progress.clear()
        print(
            f"router migrate: {name}: starting no more cutovers; waiting for {running} running "
            "one(s) to finish (never abandoned mid-hold)",
            file=err,
            flush=True,
        )
        migration.stop(f"interrupted ({name})", interrupted=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted, signum)
    journal.write(
        "run",
        pid=os.getpid(),
        tenants=len(entries),
        flag=writer.describe(),
        admins=admins,
        concurrency=args.concurrency,
        rate=args.rate,
        wave_size=args.wave_size,
    )
    print(
        f"migrate {len(entries)} tenant(s) from {args.tenants}: {writer.describe()}, "
        f"{len(admins)} router(s), journal {journal_path}",
        file=out,
        flush=True,
    )
    try:
        summary = await migration.run(states)
        journal.write("end", **summary.to_json())
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        journal.close()
        await writer.aclose()
    _print_summary(summary, out)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.failed or summary.not_started:
        return EXIT_FAILED
    return EXIT_OK


def _print_summary(summary: Summary, out: IO[str]) -> None:
    mean = "-" if summary.mean_ms is None else f"{summary.mean_ms:.0f} ms"
    print("summary:", file=out)
    print(f"  moved           {len(summary.moved)}", file=out)
    print(f"  already on new  {len(summary.already_new)}", file=out)
    print(f"  done earlier    {len(summary.done_before)} (journal)", file=out)
    print(f"  failed          {len(summary.failed)}", file=out)
    for tenant, reason in summary.failed.items():
        print(f"    {tenant}: {reason}", file=out)
    print(f"  not started     {len(summary.not_started)}", file=out)
    print(f"  elapsed         {summary.elapsed_s:.1f} s, mean cutover {mean}", file=out)
    if summary.stopped:
        print(f"  stopped early: {summary.stopped}; rerun the same command to resume", file=out)
    out.flush()


# ---- registration -----------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    one = with_config(
        sub.add_parser(
            "cutover",
            help="move one tenant to new safely, or roll it back",
            description="Move TENANT from legacy to new on every --admin router: hold its "
            "new requests, let its legacy requests drain, flip its flag to new, verify that "
            "every router routes it to new. A step that fails before the flip rolls the "
            "tenant back to legacy, and so does Ctrl-C before the flip (after it, the "
            "cutover finishes). Exit 0 on new, 1 not moved, 2 usage (nothing done), 130 "
            "interrupted and rolled back.",
        )
    )
    one.add_argument("tenant")
    _add_common(one)
    one.add_argument("--json", action="store_true", help="one JSON document on stdout")
    one.add_argument(
        "--resume-hold",
        action="store_true",
        help="the flag says hold (an earlier cutover stopped midway): drain and finish it",
    )
    one.set_defaults(
        func=reporting_usage_errors("cutover", cmd_cutover, MigrateError, FlagWriterError)
    )

    many = with_config(
        sub.add_parser(
            "migrate",
            help="cut over every tenant of a file, in waves, resumably",
            description="Cut over every tenant of --tenants FILE, smallest first when it "
            "gives sizes: wave by wave, --concurrency at once, at most --rate starts a "
            "minute, each as `router cutover` does. A journal records every step, so "
            "rerunning the same command resumes. Exit 0 every tenant on new, 1 some not, 2 "
            "usage, 130 interrupted (rerun to resume).",
        )
    )
    many.add_argument(
        "--tenants",
        type=Path,
        required=True,
        metavar="FILE",
        help="one tenant per line, or tenant,size (CSV: smallest first)",
    )
    _add_common(many)
    many.add_argument(
        "--concurrency",
        type=count,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"cutovers at once (default {DEFAULT_CONCURRENCY})",
    )
    many.add_argument(
        "--rate",
        type=non_negative,
        default=0.0,
        metavar="PER_MIN",
        help="at most this many cutover starts a minute (default 0: no limit)",
    )
    many.add_argument(
        "--wave-size",
        type=count,
        default=DEFAULT_WAVE_SIZE,
        metavar="N",
        help=f"tenants per wave; a wave ends before the next starts (default {DEFAULT_WAVE_SIZE})",
    )
    many.add_argument(
        "--journal", type=Path, metavar="PATH", help="journal file (default FILE.journal)"
    )
    many.add_argument(
        "--max-failures",
        type=int,
        default=10,
        metavar="N",
        help="stop starting cutovers after N failures (default 10; 0: never)",
    )
    many.add_argument(
        "--eta-window",
        type=count,
        default=20,
        metavar="N",
        help="completions the rate and ETA are computed over (default 20)",
    )
    many.add_argument(
        "--progress-interval",
        type=positive,
        default=10.0,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (default 10)",
    )
    many.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and each tenant's flag; change nothing",
    )
    many.set_defaults(
        func=reporting_usage_errors("migrate", cmd_migrate, MigrateError, FlagWriterError)
    )
