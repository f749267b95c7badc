"""`router tenants ...`: the ratchet ledger from the command line (ledger.py).

    router tenants ledger [--config F] [--json]            # every ledgered tenant: when, by
    router tenants show TENANT [--config F] [--json]       # one tenant's entry
    router tenants rollback TENANT --accept-data-loss [--config F]

The ledger is the config's `ledger` setting (or ROUTER_LEDGER). Exit status: 0 ok; 1 the
tenant is not in the ledger, or the ledger could not be read or written; 2 bad
configuration or usage (an invalid tenant id, a rollback without --accept-data-loss).
Tenant ids are checked against the config's tenant.max_length, as the routers check them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from router.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    check_tenant_id,
    reporting_usage_errors,
    settings_from,
    with_config,
)
from router.control.ledger import (
    Ledger,
    LedgerError,
    SqliteLedger,
    list_entries,
    open_ledger,
    sqlite_path,
)

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = sub.add_parser(
        "tenants",
        help="tenants kept on new by the ratchet: list, show, roll back",
        description="The ratchet ledger: once new has served a tenant, the routers record "
        "it there and never route it back to legacy (replication runs legacy -> new only, "
        "so legacy lacks what it wrote on new). List the ledger, show one tenant, or roll "
        "one back.",
    )
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)

    listing = with_config(tenants_sub.add_parser("ledger", help="list every ledgered tenant"))
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=reporting_usage_errors("tenants ledger", cmd_ledger))

    show = with_config(tenants_sub.add_parser("show", help="one tenant's ledger entry"))
    show.add_argument("tenant")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=reporting_usage_errors("tenants show", cmd_show))

    rollback = with_config(
        tenants_sub.add_parser(
            "rollback",
            help="remove TENANT from the ledger so it may be routed to legacy again",
            description="Remove TENANT from the ratchet ledger. Data it wrote on new since "
            "its cutover is not on legacy (replication runs legacy -> new only): routing it "
            "back loses that data from the tenant's view. Then change its flag to legacy.",
        )
    )
    rollback.add_argument("tenant")
    rollback.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="required: you accept that data written on new since the cutover stays behind",
    )
    rollback.set_defaults(func=reporting_usage_errors("tenants rollback", cmd_rollback))


# ---- commands ---------------------------------------------------------------------------


def cmd_ledger(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    entries = _with_ledger(ledger, list_entries)
    if args.json:
        print(json.dumps({"ledger": ledger.url, "tenants": entries}, indent=2))
        return EXIT_OK
    if not entries:
        print(f"no tenants in the ratchet ledger ({ledger.url})")
        return EXIT_OK
    width = max(len("TENANT"), *(len(e["tenant"]) for e in entries))
    print(f"{'TENANT':<{width}}  {'RECORDED (UTC)':<19}  BY")
    for e in entries:
        print(f"{e['tenant']:<{width}}  {_when(e['recorded_at']):<19}  {e['by'] or '?'}")
    noun = "tenant" if len(entries) == 1 else "tenants"
    print(f"{len(entries)} {noun} in the ratchet ledger ({ledger.url})")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    ledger = _ledger(args, args.tenant)

    async def entry(ledger: Ledger) -> dict[str, Any] | None:
        return await ledger.entry(args.tenant)

    found = _with_ledger(ledger, entry)
    if args.json:
        body = {"tenant": args.tenant, "ledgered": found is not None, "ledger": ledger.url}
        if found is not None:
            body.update(recorded_at=found["recorded_at"], by=found["by"])
        print(json.dumps(body, indent=2))
    elif found is None:
        print(f"{args.tenant} is not in the ratchet ledger ({ledger.url})")
    else:
        print(f"tenant    {args.tenant}")
        print("ledgered  yes: served by new, so never routed back to legacy")
        print(f"recorded  {_when(found['recorded_at'])} UTC")
        print(f"by        {found['by'] or '?'}")
        print(f"ledger    {ledger.url}")
    return EXIT_OK if found is not None else EXIT_FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    ledger = _ledger(args, args.tenant)
    tenant = args.tenant
    if not args.accept_data_loss:
        print(
            f"router tenants rollback: refused without --accept-data-loss ({tenant} stays in\n"
            "the ratchet ledger). A ledgered tenant has been served by new, and replication\n"
            f"runs one way (legacy -> new): data {tenant} wrote on new since its cutover is NOT\n"
            "on legacy. Routed back to legacy, the tenant no longer sees that data, and its\n"
            "data is split between the two sides. If you accept that, repeat the command with\n"
            "--accept-data-loss.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def rollback(ledger: Ledger) -> tuple[dict[str, Any] | None, bool]:
        entry = await ledger.entry(tenant)
        return entry, await ledger.remove(tenant)

    entry, removed = _with_ledger(ledger, rollback)
    if not removed:
        print(
            f"router tenants rollback: {tenant} is not in the ratchet ledger ({ledger.url});"
            " nothing to roll back",
            file=sys.stderr,
        )
        return EXIT_FAILED
    when = _when(entry["recorded_at"]) + " UTC" if entry else "?"
    by = (entry or {}).get("by") or "?"
    print(f"removed {tenant} from the ratchet ledger ({ledger.url})")
    print(f"  its entry: recorded {when} by {by}")
    print(
        f"Next: set {tenant}'s flag back to legacy, now, e.g.\n"
        f"  router flags set {tenant} legacy\n"
        "(or in LaunchDarkly). Routers re-read the ledger on every flag change; until one\n"
        f"happens they keep sending {tenant} to new, and while its flag says new a router\n"
        "that starts would ledger it again. If its flag already says legacy, change it\n"
        f"anyway (router flags set {tenant} hold, then legacy) so that routers re-read."
    )
    return EXIT_OK


# ---- helpers ----------------------------------------------------------------------------


def _ledger(args: argparse.Namespace, tenant: str | None = None) -> Ledger:
    """The configured ledger (not opened yet); a UsageError for a tenant id the routers
    would not route, or a ledger URL they could not open (a ConfigError for a bad config:
    router.cli.main reports it)."""
    settings = settings_from(args)
    if tenant is not None:
        check_tenant_id(tenant, settings.tenant.max_length)
    try:
        if urlsplit(settings.ledger).scheme == "sqlite":
            # Never create a ledger file here: a missing one means a path the routers do
            # not use (or no router yet), which must not pass for an empty ledger.
            return SqliteLedger(sqlite_path(settings.ledger), create=False)
        return open_ledger(settings.ledger)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None


def _with_ledger(ledger: Ledger, action: Callable[[Ledger], Awaitable[T]]) -> T:
    """Open the ledger, run `action`, close it. A LedgerError (unreachable, corrupt):
    its message on stderr and exit status 1."""

    async def run() -> T:
        await ledger.start()
        try:
            return await action(ledger)
        finally:
            await ledger.close()

    try:
        return asyncio.run(run())
    except LedgerError as exc:
        print(f"router tenants: ledger error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None


def _when(recorded_at: float | None) -> str:
    if recorded_at is None:
        return "?"
    return datetime.fromtimestamp(recorded_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
