"""What every `router` command shares: exit statuses, usage errors, where the config is and
what it says, the routers' admin URLs and token, argument types, the tenant-id check.

A command module imports these by their public names; none imports another command
module's helpers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlsplit

import yaml

from router.domain import (
    DEFAULT_TENANT_ID_MAX_LENGTH,
    TENANT_ID_MAX_LENGTH_LIMIT,
    is_tenant_id,
    tenant_id_rule,
)
from router.settings import Settings, load_settings

# Exit statuses, the same for every command (docs/contracts.md).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # the command ran and failed (or was refused by a router)
EXIT_USAGE: Final = 2  # bad arguments, environment or configuration: nothing was done
EXIT_INTERRUPTED: Final = 130  # SIGINT/SIGTERM stopped a long run safely (128 + SIGINT)

DEFAULT_CONFIG: Final = "config/router.yaml"

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments, environment or configuration: the command prints the message and
    exits EXIT_USAGE, having changed nothing."""


def reporting_usage_errors(command: str, func: Command, *usage_errors: type[Exception]) -> Command:
    """`func`, except that a UsageError (or one of `usage_errors`) is printed as
    `router COMMAND: message` on stderr and gives EXIT_USAGE."""
    caught: tuple[type[Exception], ...] = (UsageError, *usage_errors)

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except caught as exc:
            print(f"router {command}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command the --config option every command that reads settings takes."""
    parser.add_argument(
        "--config",
        type=Path,
        help=f"the routers' YAML settings (default: $ROUTER_CONFIG, else {DEFAULT_CONFIG} "
        "when it exists)",
    )
    return parser


# ---- the configuration ------------------------------------------------------------------


def config_path(args: argparse.Namespace) -> str | None:
    """--config, else ROUTER_CONFIG, else config/router.yaml when it exists, else None
    (settings from the environment only)."""
    if args.config:
        return str(args.config)
    from_env = os.environ.get("ROUTER_CONFIG")
    if from_env:
        return from_env
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def settings_from(args: argparse.Namespace) -> Settings:
    """The router's settings, validated in full as `router serve` would (ConfigError
    otherwise: router.cli.main reports it with EXIT_USAGE). --workers, when the command
    has it, overrides the configured number."""
    env = dict(os.environ)
    # `is not None`, not truthiness: `--workers 0` must be rejected (exit 2), not silently
    # replaced by the configured value.
    if getattr(args, "workers", None) is not None:
        env["ROUTER_WORKERS"] = str(args.workers)
    return load_settings(config_path(args), env)


def config_tree(args: argparse.Namespace) -> dict[str, Any] | None:
    """The config file as plain YAML, for the few keys the operator tools read without
    validating the rest (the SRE's machine need not hold the routers' upstream settings);
    None when there is no config file. A named file that cannot be read is a UsageError."""
    path = config_path(args)
    if path is None:
        return None
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read the config: {exc}") from None
    return tree if isinstance(tree, dict) else {}


def config_section(tree: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """One top-level section of `config_tree`'s answer ({} when absent or not a mapping)."""
    section = (tree or {}).get(name)
    return section if isinstance(section, dict) else {}


def tenant_max_length(tree: dict[str, Any] | None) -> int:
    """The config's `tenant.max_length` (the longest tenant id the routers route), else the
    default; a value the router would refuse to start with is a UsageError."""
    value = config_section(tree, "tenant").get("max_length", DEFAULT_TENANT_ID_MAX_LENGTH)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 1 <= value <= TENANT_ID_MAX_LENGTH_LIMIT
    ):
        raise UsageError(
            f"the config's tenant.max_length must be an integer from 1 to "
            f"{TENANT_ID_MAX_LENGTH_LIMIT}, got {value!r}"
        )
    return value


def check_tenant_id(tenant: str, max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH) -> str:
    """`tenant` when the routers would route it (router.domain's rule), else a UsageError."""
    if not is_tenant_id(tenant, max_length):
        raise UsageError(f"{tenant!r} is not a valid tenant id ({tenant_id_rule(max_length)})")
    return tenant


# ---- the routers' admin ports -----------------------------------------------------------


def admin_urls(urls: list[str]) -> list[str]:
    """The --admin URLs, checked and de-duplicated, without a trailing slash."""
    admins: list[str] = []
    for url in urls:
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


def admin_token() -> str:
    """ROUTER_ADMIN_TOKEN: never an argument (argv is visible to every user of the machine)."""
    token = os.environ.get("ROUTER_ADMIN_TOKEN", "")
    if not token:
        raise UsageError(
            "ROUTER_ADMIN_TOKEN is not set (the routers' admin token; it is never taken as "
            "an argument)"
        )
    return token


# ---- argument types ---------------------------------------------------------------------


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive(text: str) -> float:
    """A number > 0 (seconds, intervals)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative(text: str) -> float:
    """A number >= 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def count(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1], e.g. a required match rate."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1], e.g. 0.999 for 99.9 %; got {text}"
        )
    return value


# ---- output -----------------------------------------------------------------------------


def marks(stream: IO[str]) -> tuple[str, str]:
    """(success, failure) marks: ✓ and ✗ where `stream` can encode them, else OK and FAIL."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "✓✗".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "OK", "FAIL"
    return "✓", "✗"
