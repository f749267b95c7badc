"""The compiled hot path (setup.py, router/service/native.py): which build runs, and no stale one.

A compiled module shadows its .py, so a build older than its sources would run old code
silently. These tests build small package directories by hand (the digests file and an
extension-named file beside a source are all build_state() reads), and, where the checkout
is compiled (always under CI: conftest.py), check the real build (the CLI's refusal, a
process, is in tests/system/test_native_cli.py).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
from pathlib import Path

import pytest

from router.service.native import StaleBuild, build_state, check_fresh
from tests.support.paths import REPO

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(root: Path, sources: dict[str, str], compiled: list[str]) -> Path:
    """root/pkg with `sources`, a build record of all of them, and an 'extension' beside
    each of `compiled` (build_state only looks for the file)."""
    package = root / "pkg"
    package.mkdir()
    digests = {}
    for name, text in sources.items():
        (package / name).write_text(text)
        digests[f"pkg/{name}"] = hashlib.sha256(text.encode()).hexdigest()
    for name in compiled:
        (package / name).with_suffix(SUFFIX).write_bytes(b"\x7fELF")
    modules = tuple(f"pkg/{name}" for name in compiled)
    (package / "_compiled.py").write_text(f"COMPILED = {modules!r}\nDIGESTS = {digests!r}\n")
    return package


def test_no_build_record_is_pure_python(tmp_path: Path) -> None:
    (tmp_path / "front.py").write_text("x = 1\n")
    state = check_fresh(tmp_path)
    assert state.compiled == () and state.changed == ()
    assert state.describe == "pure Python (not compiled)"


def test_a_fresh_build_is_compiled(tmp_path: Path) -> None:
    package = _package(tmp_path, {"front.py": "x = 1\n", "errors.py": "y = 2\n"}, ["front.py"])
    state = check_fresh(package)
    assert state.compiled == ("pkg/front.py",)
    assert state.changed == ()
    assert state.describe == "compiled with mypyc (1 modules)"


def test_a_changed_dependency_makes_the_build_stale(tmp_path: Path) -> None:
    # errors.py is not compiled itself, but the compiled module was built against it.
    package = _package(tmp_path, {"front.py": "x = 1\n", "errors.py": "y = 2\n"}, ["front.py"])
    (package / "errors.py").write_text("y = 3\n")
    assert build_state(package).changed == ("pkg/errors.py",)
    with pytest.raises(StaleBuild, match=r"pkg/errors\.py changed since.*make compile"):
        check_fresh(package)


def test_a_record_without_extensions_is_not_stale(tmp_path: Path) -> None:
    # Compiled files removed by hand (not `make clean`): the sources run, nothing is stale.
    package = _package(tmp_path, {"front.py": "x = 1\n"}, [])
    (package / "front.py").write_text("x = 2\n")
    state = check_fresh(package)
    assert state.compiled == () and state.changed == ("pkg/front.py",)


def test_an_install_without_sources_is_not_stale(tmp_path: Path) -> None:
    package = _package(tmp_path, {"front.py": "x = 1\n"}, ["front.py"])
    (package / "front.py").unlink()
    assert check_fresh(package).changed == ()


def test_a_damaged_record_is_refused(tmp_path: Path) -> None:
    package = _package(tmp_path, {"front.py": "x = 1\n"}, ["front.py"])
    (package / "_compiled.py").write_text("COMPILED = 'front'\n")
    with pytest.raises(StaleBuild, match="not a build record"):
        build_state(package)


# ---- the checkout's own build ------------------------------------------------------------

compiled_only = pytest.mark.skipif(
    not build_state().compiled, reason="pure-Python checkout (make compile builds the hot path)"
)


def _setup_compiled_modules() -> tuple[str, ...]:
    namespace: dict[str, object] = {"__file__": str(REPO / "setup.py")}
    source = (REPO / "setup.py").read_text().replace("\nmain()\n", "\n")  # no build
    exec(compile(source, "setup.py", "exec"), namespace)
    modules = namespace["COMPILED_MODULES"]
    assert isinstance(modules, tuple)
    return modules


@compiled_only
def test_the_hot_path_runs_compiled() -> None:
    assert build_state().compiled == _setup_compiled_modules()
    for path in _setup_compiled_modules():
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert module.__file__ is not None and module.__file__.endswith(SUFFIX), path
