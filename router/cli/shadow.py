"""`router shadow ...`: how new's answers compare with legacy's, from every router.

    router shadow report TENANT [--admin URL ...] [--json] [--limit N] [--config F]
    router shadow reset TENANT [--admin URL ...] [--config F]

`report` asks each router's admin port (GET /admin/shadow?tenant=T&limit=N), sums the
tenant's counters over them (the match rate is recomputed from the sums: matched of
compared), unions the learned noise and merges the recent mismatches, newest first, N at
most (default 50). `--json` prints the merged view as one JSON document. `reset` forgets
the tenant's counts, mismatches and learned noise on every router (DELETE
/admin/shadow/TENANT), e.g. to count afresh once new is fixed.

--admin is repeatable: give every router instance. Without it, the router on this machine:
http://127.0.0.1:PORT, PORT from ROUTER_ADMIN_LISTEN, else server.admin_listen of the config
(--config, ROUTER_CONFIG or config/router.yaml), else 8081. The admin token comes from the
environment, never from an argument (argv is visible to every user of the machine):
ROUTER_ADMIN_TOKEN.

Exit status: 0 done (the report covers every router; every router reset the tenant). 1 a
router was unreachable or answered an error (each named on stderr, with why); `report` still
prints what the others answered, headed PARTIAL (and "complete": false in --json), because
at 3 a.m. some figures beat none, but it never passes for the whole picture. 2 usage: an
invalid tenant id (here or as a router says), a bad --admin URL or config, no
ROUTER_ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import httpx

from router.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    admin_token,
    admin_urls,
    check_tenant_id,
    config_section,
    config_tree,
    count,
    marks,
    reporting_usage_errors,
    tenant_max_length,
    with_config,
)
from router.control.cutover import MISMATCH_KINDS, Routers, ShadowTotals, ShadowView, format_rate
from router.proxy.accesslog import QueryRedactor
from router.settings import DEFAULT_REDACT_QUERY_PARAMS

DEFAULT_ADMIN_PORT = 8081
DEFAULT_LIMIT = 50
MAX_DIFF_LINES = 20  # body diff lines shown per mismatch (--json has them all)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shadow = sub.add_parser(
        "shadow",
        help="compare new's answers with legacy's (report, reset)",
        description="Before moving a tenant: how new's answers to copies of its requests "
        "compare with legacy's, summed over every router (report), and starting the "
        "count afresh (reset).",
    )
    shadow_sub = shadow.add_subparsers(dest="shadow_command", required=True)

    report = with_config(
        shadow_sub.add_parser(
            "report",
            help="one tenant's shadow figures summed over every router, and its recent mismatches",
            description="Sum TENANT's shadow comparisons over every --admin router: match "
            "rate, mismatches by kind, learned noise, and the recent mismatches (newest "
            "first). Exit 0 when every router answered, 1 when one did not (the others' "
            "figures are still printed, marked PARTIAL), 2 on a usage error.",
        )
    )
    report.add_argument("tenant", help="the tenant id")
    _add_admin(report)
    report.add_argument("--json", action="store_true", help="one JSON document on stdout")
    report.add_argument(
        "--limit",
        type=count,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"recent mismatches to show, newest first (default {DEFAULT_LIMIT})",
    )
    report.set_defaults(func=reporting_usage_errors("shadow report", cmd_report))

    reset = with_config(
        shadow_sub.add_parser(
            "reset",
            help="forget one tenant's shadow counts, mismatches and learned noise on every router",
            description="Forget TENANT's shadow counts, mismatches and learned noise on "
            "every --admin router, e.g. to count afresh once new is fixed. Exit 0 when "
            "every router did it, 1 when one did not, 2 on a usage error.",
        )
    )
    reset.add_argument("tenant", help="the tenant id")
    _add_admin(reset)
    reset.set_defaults(func=reporting_usage_errors("shadow reset", cmd_reset))


def _add_admin(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin",
        action="append",
        metavar="URL",
        help="a router's admin URL (http://host:8081); repeat for every router instance "
        "(default: this machine's router, port from the config's server.admin_listen)",
    )


# ---- router shadow report ---------------------------------------------------------------

_REDACTOR = QueryRedactor(DEFAULT_REDACT_QUERY_PARAMS)


def cmd_report(args: argparse.Namespace) -> int:
    tenant, admins, token = _prepare(args)
    views = asyncio.run(_ask(admins, token, lambda r, a: r.shadow(a, tenant, args.limit)))
    out, err = sys.stdout, sys.stderr
    for view in views:
        if view.error:
            print(f"router shadow report: {view.describe()}", file=err)
    if any(v.bad_request for v in views):
        return EXIT_USAGE  # the router says the tenant id is not valid: said above
    if all(v.body is None for v in views):
        print(f"router shadow report: no router answered; no report for {tenant}", file=err)
        return EXIT_FAILED
    totals = ShadowTotals.merge(tenant, views, args.limit)
    # The routers redact the paths they keep already; this covers a router of an older
    # version (or one configured to redact less): a report is pasted into tickets.
    for entry in totals.recent:
        path = entry.get("path")
        if isinstance(path, str):
            entry["path"] = _REDACTOR.redact(path)
    if args.json:
        print(json.dumps(totals.to_json(), indent=2), file=out)
    else:
        _print_report(totals, args.limit, out)
    return EXIT_OK if totals.complete else EXIT_FAILED


def _print_report(totals: ShadowTotals, limit: int, out: IO[str]) -> None:
    views = totals.routers
    full = [v for v in views if v.ok]
    print(
        f"shadow report for {totals.tenant}: {len(full)} of {len(views)} router(s) answered "
        f"({', '.join(v.url for v in views)})",
        file=out,
    )
    if not totals.complete:
        print(
            "PARTIAL: not every router answered in full (see stderr); the figures below "
            "leave out what they hold",
            file=out,
        )
    off = [v.url for v in views if v.body is not None and not v.enabled]
    if off:
        print(f"shadow traffic is NOT enabled on: {', '.join(off)}", file=out)
    c = totals.counts
    if not c["shadowed"] and not c["compared"] and not c["dropped"] and not totals.recent:
        print(f"no shadow traffic recorded for {totals.tenant} yet", file=out)
        return
    rate = (
        f"{format_rate(totals.matched, totals.compared)} % "
        f"({totals.matched} of {totals.compared} compared)"
        if totals.compared
        else "- (nothing compared yet)"
    )
    kinds = ", ".join(
        f"{kind} {n}"
        for kind, n in totals.mismatch_kinds.items()
        if n or kind in MISMATCH_KINDS  # the known kinds always; others when seen
    )
    noise = []
    if totals.noise_headers:
        noise.append("headers " + ", ".join(_safe(h) for h in totals.noise_headers))
    if totals.noise_json_paths:
        noise.append("json paths " + ", ".join(_safe(p) for p in totals.noise_json_paths))
    rows = [
        ("shadowed", str(c["shadowed"])),
        ("compared", str(c["compared"])),
        ("match rate", rate),
        ("mismatched", f"{c['mismatched']} ({kinds})"),
        ("dropped", str(c["dropped"])),
        ("noisy", str(c["noisy"])),
        ("incomplete", str(c["incomplete"])),
        ("learned noise", "; ".join(noise) or "none"),
        ("first seen", _when(totals.first_at)),
        ("last seen", _when(totals.last_at)),
    ]
    for name, value in rows:
        print(f"  {name:<14}{value}", file=out)
    if not totals.recent:
        print("no recent mismatches", file=out)
        return
    print(
        f"recent mismatches, newest first ({len(totals.recent)} shown, --limit {limit}):",
        file=out,
    )
    for entry in totals.recent:
        _print_mismatch(entry, out)


def _print_mismatch(entry: dict[str, Any], out: IO[str]) -> None:
    at = entry.get("at")
    when = _when(at if isinstance(at, int | float) else None)
    print(f"  {when}  {_safe(entry.get('method'))} {_safe(entry.get('path'))}", file=out)
    print(
        f"      request id  {_safe(entry.get('request_id'))}  (router {entry.get('router')})",
        file=out,
    )
    kinds = entry.get("kinds")
    if isinstance(kinds, list):
        print(f"      kinds       {', '.join(_safe(k) for k in kinds) or '-'}", file=out)
    status = entry.get("status")
    if isinstance(status, dict):
        print(
            f"      status      legacy {_safe(status.get('legacy'))} -> "
            f"new {_safe(status.get('new'))}",
            file=out,
        )
    headers = entry.get("headers")
    if isinstance(headers, dict):
        for name, sides in sorted(headers.items()):
            sides = sides if isinstance(sides, dict) else {}
            print(
                f"      header      {_safe(name)}: legacy {_value(sides.get('legacy'))} -> "
                f"new {_value(sides.get('new'))}",
                file=out,
            )
    body = entry.get("body")
    if isinstance(body, dict):
        print(
            f"      body        legacy {_safe(body.get('legacy_bytes'))} bytes, "
            f"new {_safe(body.get('new_bytes'))} bytes",
            file=out,
        )
        diff = body.get("diff")
        if isinstance(diff, list):
            for line in diff[:MAX_DIFF_LINES]:
                print(f"                  {_safe(line)}", file=out)
            if len(diff) > MAX_DIFF_LINES:
                print(
                    f"                  ... {len(diff) - MAX_DIFF_LINES} more (--json)",
                    file=out,
                )
    if entry.get("error") is not None:
        print(f"      error       new failed: {_safe(entry.get('error'))}", file=out)


# ---- router shadow reset ----------------------------------------------------------------


def cmd_reset(args: argparse.Namespace) -> int:
    tenant, admins, token = _prepare(args)
    views = asyncio.run(_ask(admins, token, lambda r, a: r.reset_shadow(a, tenant)))
    check, cross = marks(sys.stdout)
    for view in views:
        if view.ok:
            print(f"{check} {view.url}: {tenant}'s shadow figures reset", file=sys.stdout)
        else:
            print(f"{cross} {view.describe()}", file=sys.stdout)
            print(f"router shadow reset: {view.describe()}", file=sys.stderr)
    done = sum(v.ok for v in views)
    print(f"reset {tenant} on {done} of {len(views)} router(s)", file=sys.stdout)
    if any(v.bad_request for v in views):
        return EXIT_USAGE
    return EXIT_OK if done == len(views) else EXIT_FAILED


# ---- helpers ----------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """(tenant, admin URLs, token), or a UsageError."""
    tree = config_tree(args)
    tenant = check_tenant_id(args.tenant, tenant_max_length(tree))
    admins = admin_urls(args.admin) if args.admin else [_default_admin(tree)]
    return tenant, admins, admin_token()


async def _ask(
    admins: list[str],
    token: str,
    call: Callable[[Routers, str], Any],
) -> list[ShadowView]:
    async with httpx.AsyncClient() as client:
        routers = Routers(client, admins, token)
        return list(await asyncio.gather(*(call(routers, a) for a in routers.admins)))


def _default_admin(tree: dict[str, Any] | None) -> str:
    """http://HOST:PORT of this machine's router: ROUTER_ADMIN_LISTEN, else the config's
    server.admin_listen, else port 8081; a wildcard host (0.0.0.0, ::) means 127.0.0.1."""
    listen = os.environ.get("ROUTER_ADMIN_LISTEN") or config_section(tree, "server").get(
        "admin_listen"
    )
    if listen is None:
        return f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}"
    host, sep, port = str(listen).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UsageError(
            f"admin_listen {listen!r} is not host:port; give the router with --admin URL"
        )
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(port)}"


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{stamp} UTC ({_ago(time.time() - at)})"


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future: clocks differ?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _safe(value: Any) -> str:
    """A value from the wire as one printable line: control characters in a client's path
    or a header never reach the terminal raw."""
    text = "-" if value is None else str(value)
    return text if text.isprintable() else repr(text)[1:-1]


def _value(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, str):
        return _safe(repr(value))
    return _safe(json.dumps(value))
