"""`router sign TENANT legacy|new`: the headers that force TENANT's test requests to a side.

    router sign TENANT legacy|new [--secret-env NAME] [--format headers|curl|json]

The secret is read from the environment only (`ROUTER_OVERRIDE_SECRET`, or the variable
named by --secret-env), never from an argument: an argument lands in shell history and in
`ps` for every user of the machine. The signature is valid for the router's
`routing.override_window` (default 300 s) around now; see router/control/override.py for the
format, to produce it from a test suite directly.

    --format headers   X-Router-Target: new
                       X-Router-Signature: t=...,v1=...
    --format curl      -H X-Router-Target:new -H X-Router-Signature:t=...,v1=...
                       (no characters a shell would interpret, so both copy-paste and
                       `curl $(router sign acme new --format curl) URL` work)
    --format json      {"X-Router-Target": "new", "X-Router-Signature": "t=...,v1=..."}

Exit status: 0 ok, 2 usage (no secret in the environment, invalid tenant id).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable

from router.control.override import TARGETS, signed_headers

DEFAULT_SECRET_ENV = "ROUTER_OVERRIDE_SECRET"
EXIT_USAGE = 2


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """Add `router sign` (it reads no configuration file: `with_config` is unused)."""
    del with_config
    parser = sub.add_parser(
        "sign",
        help="print signed X-Router-Target headers for test traffic",
        description="Print the X-Router-Target and X-Router-Signature headers that force "
        "TENANT's requests to a side. The secret is read from the environment only.",
    )
    parser.add_argument("tenant", help="the tenant id the router identifies for the requests")
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        metavar="NAME",
        help=f"environment variable holding the shared secret (default {DEFAULT_SECRET_ENV})",
    )
    parser.add_argument(
        "--format",
        choices=("headers", "curl", "json"),
        default="headers",
        help="header lines (default), curl -H arguments, or a JSON object",
    )
    parser.set_defaults(func=cmd_sign)


def cmd_sign(args: argparse.Namespace) -> int:
    from router.proxy.identify import TenantIdentifier
    from router.settings import TenantSettings

    secret = os.environ.get(args.secret_env)
    if not secret:
        print(
            f"router sign: no secret: set the environment variable {args.secret_env}"
            " (the secret is never taken from the command line)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not TenantIdentifier(TenantSettings()).is_valid(args.tenant):
        print(
            f"router sign: {args.tenant!r} is not a valid tenant id"
            " (1-128 characters from A-Z a-z 0-9 . _ : @ -)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    headers = signed_headers(secret, args.target, args.tenant)
    if args.format == "json":
        print(json.dumps(headers))
    elif args.format == "curl":
        print(
            shlex.join(arg for name, value in headers.items() for arg in ("-H", f"{name}:{value}"))
        )
    else:
        for name, value in headers.items():
            print(f"{name}: {value}")
    return 0
