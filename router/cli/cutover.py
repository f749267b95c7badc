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
tenant-routing.

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
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

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

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_CONFIG = "config/router.yaml"
OUTCOMES = {
    "moved": "moved",
    "already-new": "already on new",
    "refused": "refused (nothing changed)",
    "rolled-back": "rolled back to legacy",
    "stuck": "STUCK",
}

Writer = FileFlagWriter | LaunchDarklyFlagWriter


class UsageError(Exception):
    """Bad arguments or environment: exit 2 with the message."""


def _marks(stream: IO[str]) -> tuple[str, str]:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "✓✗".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "OK", "FAIL"
    return "✓", "✗"


# ---- shared options ---------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1], e.g. 0.999 for 99.9 %; got {text}"
        )
    return value


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
        type=_positive,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="S",
        help="longest wait for legacy requests in flight to finish "
        f"(default {DEFAULT_DRAIN_TIMEOUT:g}; keep it below the routers' hold_timeout)",
    )
    p.add_argument(
        "--verify-timeout",
        type=_positive,
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
        type=_non_negative,
        default=DEFAULT_MAX_LAG,
        metavar="S",
        help=f"preflight: highest acceptable lag_seconds (default {DEFAULT_MAX_LAG:g}); after "
        "the drain the lag must not reach back before the drain",
    )
    p.add_argument(
        "--replication-timeout",
        type=_positive,
        default=DEFAULT_REPLICATION_TIMEOUT,
        metavar="S",
        help=f"longest wait for replication to catch up after the drain, the tenant held "
        f"(default {DEFAULT_REPLICATION_TIMEOUT:g})",
    )
    p.add_argument(
        "--poll",
        type=_positive,
        default=0.05,
        metavar="S",
        help="interval between polls of the routers (default 0.05)",
    )
    gate = p.add_argument_group("shadow gate (router shadow report TENANT shows the figures)")
    gate.add_argument(
        "--require-shadow-match",
        type=_fraction,
        metavar="R",
        help="refuse to cut a tenant over (nothing changed) unless its shadow match rate, "
        "summed over every router, is at least R (0 < R <= 1, e.g. 0.999)",
    )
    gate.add_argument(
        "--min-samples",
        type=_count,
        metavar="N",
        help="with --require-shadow-match: refuse unless at least N shadow comparisons "
        f"(default {DEFAULT_SHADOW_MIN_SAMPLES})",
    )


def _config_tree(args: argparse.Namespace) -> dict[str, Any] | None:
    """The config file as YAML, for the few keys the CLI reads (no full validation: the
    SRE's machine need not hold the routers' upstream settings); None when none is named
    (--config, ROUTER_CONFIG) and config/router.yaml is absent. A named file that cannot
    be read is a usage error."""
    path = args.config or os.environ.get("ROUTER_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    if path is None:
        return None
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read the config: {exc}") from None
    return tree if isinstance(tree, dict) else {}


def _flag_key(args: argparse.Namespace) -> str:
    """--flag-key, else flags.flag_key of the config file, else tenant-routing."""
    if args.flag_key:
        return str(args.flag_key)
    tree = _config_tree(args)
    flags = tree.get("flags") if tree is not None else None
    key = flags.get("flag_key") if isinstance(flags, dict) else None
    if key is not None and (not isinstance(key, str) or not key):
        raise UsageError("the config's flags.flag_key must be a non-empty string")
    return key or DEFAULT_FLAG_KEY


def _writer(args: argparse.Namespace) -> Writer:
    flag_key = _flag_key(args)
    ld = args.ld_project is not None or args.ld_environment is not None
    if args.flags_file is not None and ld:
        raise UsageError("give either --flags-file or --ld-project/--ld-environment, not both")
    if args.flags_file is not None:
        if not args.flags_file.is_file():
            raise UsageError(f"--flags-file {args.flags_file}: no such file")
        return FileFlagWriter(args.flags_file, flag_key)
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
        token, args.ld_project, args.ld_environment, flag_key, base_url=args.ld_base_url
    )


def _admins(args: argparse.Namespace) -> list[str]:
    admins: list[str] = []
    for url in args.admin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"--admin must be a router's admin URL (http://host:port), got {url!r}"
            )
        if parts.path not in ("", "/") or parts.query:
            raise UsageError(f"--admin {url}: give the admin port's base URL, without a path")
        if url.rstrip("/") not in admins:
            admins.append(url.rstrip("/"))
    return admins


def _admin_token() -> str:
    token = os.environ.get("ROUTER_ADMIN_TOKEN", "")
    if not token:
        raise UsageError(
            "ROUTER_ADMIN_TOKEN is not set (the routers' admin token; it is never taken as "
            "an argument)"
        )
    return token


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


def _usage(command: str, func: Callable[[argparse.Namespace], int]) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (UsageError, MigrateError, FlagWriterError) as exc:
            print(f"router {command}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


# ---- router cutover ---------------------------------------------------------------------


def cmd_cutover(args: argparse.Namespace) -> int:
    _options(args)  # a bad combination: exit 2 before anything happens
    writer = _writer(args)
    admins = _admins(args)
    token = _admin_token()
    return asyncio.run(_cutover(args, writer, admins, token))


async def _cutover(args: argparse.Namespace, writer: Writer, admins: list[str], token: str) -> int:
    out = sys.stdout
    check, cross = _marks(out)

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
    entries, warnings = read_tenants(args.tenants)
    journal_path = args.journal or Path(f"{args.tenants}.journal")
    states, journal_warnings = Journal.load(journal_path)
    for warning in warnings + journal_warnings:
        print(f"router migrate: warning: {warning}", file=sys.stderr)
    writer = _writer(args)
    admins = _admins(args)
    token = _admin_token()
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
    check, cross = _marks(out)
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


def register(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    one = with_config(
        sub.add_parser(
            "cutover",
            help="move one tenant to new: hold, drain, new, verify (rolls back if unsafe)",
            description=__doc__.split("\n\n")[0],
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
    one.set_defaults(func=_usage("cutover", cmd_cutover))

    many = with_config(
        sub.add_parser(
            "migrate",
            help="cut over every tenant of a file: waves, bounded concurrency and rate, "
            "resumable journal",
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
        type=_count,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"cutovers at once (default {DEFAULT_CONCURRENCY})",
    )
    many.add_argument(
        "--rate",
        type=_non_negative,
        default=0.0,
        metavar="PER_MIN",
        help="at most this many cutover starts a minute (default 0: no limit)",
    )
    many.add_argument(
        "--wave-size",
        type=_count,
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
        type=_count,
        default=20,
        metavar="N",
        help="completions the rate and ETA are computed over (default 20)",
    )
    many.add_argument(
        "--progress-interval",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (default 10)",
    )
    many.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and each tenant's flag; change nothing",
    )
    many.set_defaults(func=_usage("migrate", cmd_migrate))
