"""`router sign TENANT legacy|new`: the headers that force TENANT's test requests to a side.

    router sign TENANT legacy|new [--secret-env NAME] [--format headers|curl|json]
                [--config F]

The secret is read from the environment only (`ROUTER_OVERRIDE_SECRET`, the current
secret, or the variable named by --secret-env), never from an argument. During a rotation
the routers also accept `ROUTER_OVERRIDE_SECRET_PREVIOUS`, but signing always uses the
current one, so signatures stay valid once the rotation ends (docs/operations.md). Never
from an argument: an argument lands in shell history and in `ps` for every user of the
machine. The signature is valid for the router's
`routing.override_window` (default 300 s) around now; see router/control/override.py for the
format, to produce it from a test suite directly. TENANT must be an id the routers route:
the config's `tenant.max_length` (--config, ROUTER_CONFIG or config/router.yaml) bounds it.

    --format headers   X-Router-Target: new
                       X-Router-Signature: t=...,v1=...
    --format curl      -H X-Router-Target:new -H X-Router-Signature:t=...,v1=...
                       (no characters a shell would interpret, so both copy-paste and
                       `curl $(router sign acme new --format curl) URL` work)
    --format json      {"X-Router-Target": "new", "X-Router-Signature": "t=...,v1=..."}

Exit status: 0 ok, 2 usage (no secret in the environment, invalid tenant id, unreadable
config).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from router.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    check_tenant_id,
    config_tree,
    reporting_usage_errors,
    tenant_max_length,
    with_config,
)
from router.control.override import signed_headers
from router.domain import SIDES

DEFAULT_SECRET_ENV = "ROUTER_OVERRIDE_SECRET"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = with_config(
        sub.add_parser(
            "sign",
            help="signed headers that send a tenant's test requests to one side",
            description="Print the X-Router-Target and X-Router-Signature headers that force "
            "TENANT's requests to a side. The secret is read from the environment only.",
        )
    )
    parser.add_argument("tenant", help="the tenant id the router identifies for the requests")
    parser.add_argument("side", choices=SIDES, help="the side the requests are sent to")
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
    parser.set_defaults(func=reporting_usage_errors("sign", cmd_sign))


def cmd_sign(args: argparse.Namespace) -> int:
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(
            f"router sign: no secret: set the environment variable {args.secret_env}"
            " (the secret is never taken from the command line)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    tenant = check_tenant_id(args.tenant, tenant_max_length(config_tree(args)))
    headers = signed_headers(secret, args.side, tenant)
    if args.format == "json":
        print(json.dumps(headers))
    elif args.format == "curl":
        print(
            shlex.join(arg for name, value in headers.items() for arg in ("-H", f"{name}:{value}"))
        )
    else:
        for name, value in headers.items():
            print(f"{name}: {value}")
    return EXIT_OK
