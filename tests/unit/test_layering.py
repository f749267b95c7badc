"""The layout's rules, read from the source with `ast` (nothing is imported or run):

- no module uses another module's private names (`from router.x import _name`, or
  `module._name` on an imported router module): what modules share is public, or it
  moves to the module both sides import (router/cli/common.py, router/domain.py);
- the data plane (router/proxy) depends on no operator tool, no CLI and no process
  code: it imports nothing from router.control's cutover, migrate, flag writers and flag
  file, nor from router.cli or router.service, not even for type checking.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import router

PACKAGE = Path(router.__file__).resolve().parent
ROOT = PACKAGE.parent

DATA_PLANE = "router.proxy"
NOT_FROM_THE_DATA_PLANE = (
    "router.control.cutover",
    "router.control.migrate",
    "router.control.flagwriters",
    "router.control.flagfile",
    "router.cli",
    "router.service",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module an ImportFrom names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line, module, name) for each import of `path`: name is None for `import module`,
    else what `from module import name` takes."""
    importer = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, importer, path.name == "__init__.py")
            for alias in node.names:
                yield node.lineno, module, alias.name


def private_uses(path: Path) -> Iterator[str]:
    """Where `path` uses another router module's private name."""
    where = path.relative_to(ROOT)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    modules: dict[str, str] = {}  # local name -> the router module it is bound to
    for line, module, name in imports(path):
        if not module.startswith("router"):
            continue
        if name is None:
            if any(is_private(part) for part in module.split(".")):
                yield f"{where}:{line}: import {module}"
            continue
        if is_private(name) or any(is_private(part) for part in module.split(".")):
            yield f"{where}:{line}: from {module} import {name}"
        elif is_module(f"{module}.{name}"):
            modules[name] = f"{module}.{name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("router") and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            yield f"{where}:{node.lineno}: {modules[node.value.id]}.{node.attr}"


def test_no_module_uses_another_modules_private_names() -> None:
    found = [use for path in sources() for use in private_uses(path)]
    assert found == []


def data_plane_violations() -> Iterator[str]:
    """Where a router/proxy module imports what NOT_FROM_THE_DATA_PLANE names."""
    for path in sources():
        if not module_name(path).startswith(DATA_PLANE):
            continue
        for line, module, name in imports(path):
            imported = module if name is None else f"{module}.{name}"
            if any(
                candidate == banned or candidate.startswith(banned + ".")
                for candidate in (module, imported)
                for banned in NOT_FROM_THE_DATA_PLANE
            ):
                yield f"{path.relative_to(ROOT)}:{line}: {imported}"


def test_the_data_plane_imports_no_operator_tool_cli_or_process_code() -> None:
    assert list(data_plane_violations()) == []


# ---- the checks themselves can fail ------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A router/ tree in tmp_path that the checks above read instead of the real one."""
    package = tmp_path / "router"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("")
    (package / "cli" / "cutover.py").write_text("def _admins() -> None: ...\n")
    (package / "proxy").mkdir()
    (package / "proxy" / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    return package


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from router.cli.cutover import _admins\n", "from router.cli.cutover import _admins"),
        ("from .cutover import _admins\n", "from router.cli.cutover import _admins"),
        ("from router.cli import cutover\ncutover._admins()\n", "router.cli.cutover._admins"),
        ("import router.cli.cutover as c\nc._admins()\n", "router.cli.cutover._admins"),
        ("import router.cli._hidden\n", "import router.cli._hidden"),
    ],
)
def test_a_private_use_is_found(fake_package: Path, source: str, found: str) -> None:
    path = fake_package / "cli" / "shadow.py"
    path.write_text(source)
    (use,) = private_uses(path)
    assert use.endswith(found)


def test_public_names_and_dunders_pass(fake_package: Path) -> None:
    path = fake_package / "cli" / "shadow.py"
    path.write_text("from router import __version__\nfrom router.cli.cutover import admins\n")
    assert list(private_uses(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "from router.control.cutover import cutover\n",
        "from router.control import flagfile\n",
        "import router.cli.main\n",
        "if TYPE_CHECKING:\n    from router.service.app import RouterApp\n",
        "from ..service import app\n",
    ],
)
def test_a_data_plane_import_of_the_tools_is_found(fake_package: Path, source: str) -> None:
    (fake_package / "proxy" / "handler.py").write_text(source)
    assert len(list(data_plane_violations())) == 1


def test_the_data_plane_may_import_flags_and_overrides(fake_package: Path) -> None:
    (fake_package / "proxy" / "decide.py").write_text(
        "from router.control.flags import FlagSource\nfrom router.control import override\n"
    )
    assert list(data_plane_violations()) == []
