"""Whether the hot path runs compiled (mypyc, see setup.py), and the guard against a stale
build.

A compiled module shadows its .py: after an edit, an old build would run the old code with
nothing to say so. setup.py records the SHA-256 of every source a build depends on in
router/_compiled.py; check_fresh() compares them with the sources on disk, once per process
(hashing ~250 KB: about a millisecond), and refuses a build that no longer matches.

`python -m router.service.native` says which it is (exit 0 fresh, 1 stale, 2 pure Python):
`make compile` uses it to rebuild only when needed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The router package (router/service/native.py -> router/): the digests' paths are
# relative to its parent.
PACKAGE_DIR: Final = Path(__file__).resolve().parent.parent


class StaleBuild(RuntimeError):
    """Compiled modules built from sources that have changed since."""


@dataclass(frozen=True)
class BuildState:
    # modules whose compiled form is installed (router/proxy/connection.py)
    compiled: tuple[str, ...]
    changed: tuple[str, ...]  # sources that differ from what the build was made from

    @property
    def describe(self) -> str:
        if not self.compiled:
            return "pure Python (not compiled)"
        if self.changed:
            return f"STALE compiled build: changed since: {', '.join(self.changed)}"
        return f"compiled with mypyc ({len(self.compiled)} modules)"


def _is_extension(source: Path) -> bool:
    """A compiled form of `source` sits beside it (what the import system would load)."""
    stem = source.with_suffix("")
    return any(
        Path(f"{stem}{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def build_state(package_dir: Path = PACKAGE_DIR) -> BuildState:
    """What is installed next to the sources in `package_dir`: compiled or not, and which
    sources no longer match their build. A missing source (an install without .py files)
    is not a change: there is nothing else to run."""
    digests_file = package_dir / "_compiled.py"
    if not digests_file.is_file():
        return BuildState((), ())
    namespace: dict[str, object] = {}
    exec(compile(digests_file.read_text(), str(digests_file), "exec"), namespace)
    modules = namespace.get("COMPILED")
    digests = namespace.get("DIGESTS")
    if not isinstance(modules, tuple) or not isinstance(digests, dict):
        raise StaleBuild(f"{digests_file} is not a build record: remove it and rebuild")
    root = package_dir.parent
    compiled = tuple(m for m in modules if _is_extension(root / m))
    changed = []
    for relative, digest in digests.items():
        source = root / relative
        if source.is_file() and hashlib.sha256(source.read_bytes()).hexdigest() != digest:
            changed.append(relative)
    return BuildState(compiled, tuple(changed))


def check_fresh(package_dir: Path = PACKAGE_DIR) -> BuildState:
    """Raise StaleBuild if compiled modules were built from other sources than these."""
    state = build_state(package_dir)
    if state.compiled and state.changed:
        raise StaleBuild(
            f"the compiled hot path was built from older sources ({', '.join(state.changed)}"
            " changed since): run `make compile` to rebuild it, or `make clean` to run the"
            " pure-Python source"
        )
    return state


def main() -> int:
    state = build_state()
    print(state.describe)
    if not state.compiled:
        return 2
    return 1 if state.changed else 0


if __name__ == "__main__":
    sys.exit(main())
