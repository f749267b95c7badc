"""Builds the hot path's modules to C with mypyc; everything else is in pyproject.toml.

The request path (parse, identify, decide, forward, relay, record) runs as C extensions
compiled by mypyc from the same, mypy-checked source: the per-request Python work is about
a third cheaper (docs/benchmarks.md has the figures). `ROUTER_COMPILE=0` builds the pure
Python package instead: it behaves the same, only slower.

A compiled module shadows its .py (Python imports extension modules first), so an edited
source would silently run its old build. Each build writes router/_compiled.py: the SHA-256
of every source it depends on (the compiled modules and the router modules they import,
whose types and Final constants compiled code bakes in). router.service.native.check_fresh() refuses
to run a build whose sources changed since (`router serve`, the CLI, the test session).
In a checkout, `make compile` rebuilds when needed.
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

# What every request runs through. Not compiled: the admin side, the CLI, the flag and
# ledger clients (they run once per flag change or per tenant, not per request), and
# errors.py (mypyc-compiled exception classes lose their class-level defaults).
COMPILED_MODULES = (
    "router/proxy/connection.py",  # client connections, HTTP/1.1 parsing and framing
    "router/proxy/handler.py",  # the request phases
    "router/proxy/identify.py",  # identify
    "router/proxy/decide.py",  # decide
    "router/proxy/relay.py",  # forward and relay
    "router/proxy/upstream.py",  # the upstream connection pools
    "router/proxy/metrics.py",  # record
    "router/proxy/accesslog.py",  # record
)
DIGESTS_MODULE = HERE / "router" / "_compiled.py"


def _router_imports(path: Path) -> set[Path]:
    """The router modules `path` imports (absolute `router.x` imports only: the code base
    uses no relative ones)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("router."):
                candidate = HERE / (name.replace(".", "/") + ".py")
                if candidate.is_file():
                    found.add(candidate)
    return found


def build_dependencies() -> list[Path]:
    """The compiled modules and every router module they import, transitively."""
    pending = [HERE / module for module in COMPILED_MODULES]
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path not in seen:
            seen.add(path)
            pending.extend(_router_imports(path) - seen)
    return sorted(seen)


def write_digests() -> None:
    lines = [
        '"""Written by setup.py at build time (not in git): the sources the compiled',
        'modules were built from, and their SHA-256. See router/service/native.py."""',
        "",
        "COMPILED: tuple[str, ...] = (",
        *(f'    "{module}",' for module in COMPILED_MODULES),
        ")",
        "DIGESTS: dict[str, str] = {",
    ]
    for path in build_dependencies():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f'    "{path.relative_to(HERE).as_posix()}": "{digest}",')
    lines.append("}")
    DIGESTS_MODULE.write_text("\n".join(lines) + "\n")


def main() -> None:
    if os.environ.get("ROUTER_COMPILE", "1") == "0":
        setup()
        return
    try:
        # mypyc type-checks the hot path like `make typecheck`, against the dependencies'
        # own types: they must be importable here, so no isolated build environment.
        import aiohttp  # noqa: F401
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            f"router: the compiled build needs mypy and the router's dependencies in the build"
            f" environment ({exc}): `pip install mypy setuptools <the dependencies>`, then"
            f" `pip wheel --no-build-isolation .` (the Dockerfile's builder does this); or"
            f" ROUTER_COMPILE=0 for the pure-Python package"
        ) from None

    # Written first, so that a wheel build packages it; removed if the build fails, so that
    # a broken build never looks like a fresh one.
    write_digests()
    try:
        # group_name: the shared runtime library lives in the package
        # (router/_hotpath__mypyc*.so), not top-level, where an editable install cannot see it.
        modules = list(COMPILED_MODULES)
        setup(ext_modules=mypycify(modules, opt_level="3", group_name="router._hotpath"))
    except BaseException:
        DIGESTS_MODULE.unlink(missing_ok=True)
        raise


main()
