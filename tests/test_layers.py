"""The data plane stands on its own: router/proxy imports nothing from the process layer
(router/service) or the CLI (router/cli), not even for type checking. The service layer
composes the data plane, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import router

PROXY = Path(router.__file__).parent / "proxy"


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted(PROXY.glob("*.py")), ids=lambda p: p.name)
def test_the_data_plane_imports_nothing_from_the_service_or_the_cli(path: Path) -> None:
    upward = {
        name
        for name in _imported_modules(path)
        if name.split(".")[:2] in (["router", "service"], ["router", "cli"])
    }
    assert not upward, f"{path.name} imports {sorted(upward)}"
