"""docs/contracts.md against the code: commands, admin endpoints, error codes, headers.

Each table is compared with what the code really has, both ways where the code can list
its own (commands, endpoints, error codes), so an operator reading the docs never meets a
name that does not exist, and nothing an operator can meet is missing from them. The
environment variables are checked by tests/unit/test_settings.py.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from router import errors
from router.cli.main import build_parser
from router.service.admin import build_admin_app
from tests.support.contract_doc import first_backticked, table
from tests.support.paths import REPO

_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    children = _subcommands(parser)
    if not children:
        yield path, parser
    for name, child in children.items():
        yield from _leaf_commands(child, (*path, name))


def _documented_commands() -> dict[tuple[str, ...], str]:
    """`router flags set TENANT ...` -> ("flags", "set"): the words before the arguments."""
    documented = {}
    for row in table("Command line"):
        usage = first_backticked(row["command"])
        words = usage.split()
        assert words[0] == "router", f"not a router command: {usage!r}"
        path = []
        for word in words[1:]:
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            path.append(word)
        documented[tuple(path)] = usage
    return documented


def test_the_command_table_is_every_command() -> None:
    actual = {path for path, _ in _leaf_commands(build_parser())}
    assert set(_documented_commands()) == actual


def test_every_documented_option_exists() -> None:
    leaves = dict(_leaf_commands(build_parser()))
    for path, usage in _documented_commands().items():
        known = {s for action in leaves[path]._actions for s in action.option_strings}
        unknown = set(_OPTION.findall(usage)) - known
        assert not unknown, f"router {' '.join(path)}: no option {sorted(unknown)}"


def test_the_admin_table_is_every_endpoint() -> None:
    documented = set()
    for row in table("Admin API"):
        method, _, path = first_backticked(row["endpoint"]).partition(" ")
        documented.add((method, path))
    app = build_admin_app(None)  # type: ignore[arg-type]  # the routes need no router yet
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert documented == served


def _error_classes() -> Iterator[type[errors.RouterError]]:
    """Every class that defines its own code (the intermediate classes only group them)."""
    pending: list[type[errors.RouterError]] = [errors.RouterError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "code" in vars(cls):
            yield cls


def test_the_error_table_is_every_code_with_its_status() -> None:
    documented = {
        (first_backticked(row["code"]), int(row["status"])) for row in table("Error codes")
    }
    actual = {(cls.code, cls.status) for cls in _error_classes()}
    assert documented == actual


def test_documented_response_headers_are_sent_by_the_router() -> None:
    sources = "\n".join(
        path.read_text(encoding="utf-8").lower() for path in (REPO / "router").rglob("*.py")
    )
    for row in table("Response headers"):
        name = first_backticked(row["header"])
        assert name.lower() in sources, f"{name}: the router never names this header"
