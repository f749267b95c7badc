"""The tables of docs/contracts.md, read by the tests that hold the code to them.

docs/contracts.md is where operators, the ECS task definition and the load tests learn the
names they may rely on (environment variables, commands, admin endpoints, error codes).
The tests compare those tables with the code both ways, so the document cannot drift: a
name in the docs that the code lacks fails, and so does a name in the code the docs omit.
"""

from __future__ import annotations

import re

from tests.support.paths import REPO

CONTRACTS = REPO / "docs" / "contracts.md"

_BACKTICKED = re.compile(r"`([^`]+)`")
# Cells are separated by `|`; a `|` inside a cell is written `\|` (Markdown's own rule).
_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")


def table(section: str) -> list[dict[str, str]]:
    """The rows of the first table under the `## {section}` heading, as {column: cell}."""
    lines = CONTRACTS.read_text(encoding="utf-8").splitlines()
    heading = f"## {section}"
    if heading not in lines:
        raise AssertionError(f"{CONTRACTS.name} has no section {heading!r}")
    rows: list[list[str]] = []
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            cells = _CELL_SEPARATOR.split(line.strip()[1:-1])
            rows.append([cell.strip().replace("\\|", "|") for cell in cells])
        elif rows:
            break  # the end of the first table
    if len(rows) < 3:
        raise AssertionError(f"{CONTRACTS.name}, {heading}: no table with rows")
    header, _rule, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


def first_backticked(cell: str) -> str:
    """The first `code` span of a cell (where each table keeps its name)."""
    found = _BACKTICKED.search(cell)
    if found is None:
        raise AssertionError(f"no `name` in table cell {cell!r}")
    return found.group(1)


def env_contract() -> set[str]:
    """The environment variables that override settings (the ECS task sets them)."""
    return {first_backticked(row["variable"]) for row in table("Environment variables")}
