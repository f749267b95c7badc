"""Writer for the local flags file: `router flags set`, the cutover orchestrator, bulk moves.

The file is LaunchDarkly's flag-file format, read by the SDK's own file data source
(`ldclient.integrations.Files.new_data_source`)::

    {"flags": {"tenant-routing": {
        "key": "tenant-routing", "version": 7, "on": true,
        "variations": ["legacy", "hold", "new"],
        "offVariation": 0, "fallthrough": {"variation": 0},
        "contextTargets": [
            {"contextKind": "tenant", "variation": 0, "values": ["acme"]},
            {"contextKind": "tenant", "variation": 1, "values": []},
            {"contextKind": "tenant", "variation": 2, "values": ["globex"]}],
        "targets": [], "rules": [], "prerequisites": [], "salt": "...", ...}},
     "segments": {...}, "flagValues": {...}}

A tenant's route is the variation of the `contextTargets` entry (context kind `tenant`)
that lists its id; everyone else gets the fallthrough. This module only moves tenant ids
between those lists; other flags, segments and unknown fields are carried through as is.

Two facts about the SDK (launchdarkly-server-sdk 9.x, read in its source) shape the writer:

1. Flag-change listeners (`client.flag_tracker`) fire on a file reload only for flags whose
   `version` INCREASED (`impl/datasource/status.py`,
   `__compute_changed_items_for_full_data_set`). The reload replaces the data whatever the
   version, so a write that forgets the bump changes evaluations silently and the router's
   decision cache (invalidated by those events) keeps serving the old route. Hence every
   effective write bumps the flag's version by exactly one, and a no-op writes nothing.
2. Its watchdog watcher compares only `event.src_path` with the file, so the atomic
   rename below (a temp file moved onto the path: the event's src_path is the temp file)
   goes unnoticed. Readers must use `force_polling=True`, which compares `os.path.getmtime`
   with the previous poll's value: see `_advance_mtime` for what that implies.

Writes are atomic (temp file in the same directory, fsync, `os.replace`, fsync of the
directory), so the SDK never parses a half-written file, and serialised across processes
by an exclusive `flock` on the sidecar `<file>.lock`, so concurrent cutovers lose no update.
A symlinked path is resolved first (the file and its lock live next to the link's target).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from router.domain import (
    DEFAULT_FLAG_VALUE,
    DEFAULT_TENANT_ID_MAX_LENGTH,
    FLAG_VALUES,
    tenant_id_problem,
)

DEFAULT_FLAG_KEY: Final = "tenant-routing"
CONTEXT_KIND: Final = "tenant"


class FlagFileError(Exception):
    """The flags file is missing, unreadable or malformed, or the request is invalid."""


def new_flag(flag_key: str = DEFAULT_FLAG_KEY, default: str = DEFAULT_FLAG_VALUE) -> dict[str, Any]:
    """A complete routing flag: everyone on `default`, one empty target list per flag value
    (the flag's variations are FLAG_VALUES, in that order)."""
    _check_value(default)
    if not isinstance(flag_key, str) or not flag_key:
        raise FlagFileError(f"flag key must be a non-empty string, got {flag_key!r}")
    index = FLAG_VALUES.index(default)
    return {
        "key": flag_key,
        "on": True,
        "variations": list(FLAG_VALUES),
        "offVariation": index,
        "fallthrough": {"variation": index},
        "targets": [],
        "contextTargets": [
            {"contextKind": CONTEXT_KIND, "variation": i, "values": []}
            for i in range(len(FLAG_VALUES))
        ],
        "rules": [],
        "prerequisites": [],
        # Only percentage rollouts use the salt and this flag has none; derived from the
        # key rather than random so the same call always produces the same file.
        "salt": hashlib.sha256(flag_key.encode()).hexdigest()[:32],
        "version": 1,
        "clientSide": False,
        "trackEvents": False,
        "trackEventsFallthrough": False,
        "deleted": False,
    }


def read_flag_file(path: Path) -> dict[str, Any]:
    """Parse and validate the file: a JSON object whose `flags` is an object of objects."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FlagFileError(f"{path}: flags file does not exist") from None
    except OSError as exc:
        raise FlagFileError(f"{path}: cannot read flags file: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise FlagFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise FlagFileError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # from _reject_duplicate_keys
        raise FlagFileError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise FlagFileError(f"{path}: top level must be a JSON object, not {_json_type(data)}")
    if "flags" not in data:
        raise FlagFileError(f'{path}: no "flags" object at the top level')
    for section in ("flags", "segments", "flagValues"):
        if section in data and not isinstance(data[section], dict):
            raise FlagFileError(
                f'{path}: "{section}" must be an object, not {_json_type(data[section])}'
            )
    for key, flag in data["flags"].items():
        if not isinstance(flag, dict):
            raise FlagFileError(f'{path}: flag "{key}" must be an object, not {_json_type(flag)}')
    return data


def tenant_variation(data: dict[str, Any], tenant: str, flag_key: str = DEFAULT_FLAG_KEY) -> str:
    """Where the file routes `tenant`, following the SDK's evaluation order.

    Off: `offVariation`. On: the `tenant` contextTargets entry listing it, else the
    fallthrough. A missing or deleted flag, a missing offVariation or a value outside
    FLAG_VALUES gives DEFAULT_FLAG_VALUE (legacy), as in the router. Prerequisites, rules
    and rollouts would need the SDK's evaluator, so they raise rather than give a possibly
    wrong answer.
    """
    return _tenant_variation(data, tenant, flag_key, where="flags file")


def set_tenants(
    path: Path,
    tenants: Iterable[str],
    value: str,
    flag_key: str = DEFAULT_FLAG_KEY,
    create: bool = False,
    tenant_max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH,
) -> dict[str, str]:
    """Route each tenant to `value`; return {tenant: previous route}. Tenant ids must pass
    the router's rule with the routers' `tenant.max_length` (`tenant_max_length`).

    One locked read-modify-write: at most one file write and one version bump per call,
    none if every tenant is already explicitly targeted at `value`. A missing file is an
    error unless `create`; a missing flag is added (at version 1, which the SDK reports as
    a change since it had no such flag).
    """
    _check_value(value)
    if isinstance(tenants, str):  # would iterate its characters: "acme" -> a, c, m, e
        raise FlagFileError(f"tenants must be a collection of ids, not the string {tenants!r}")
    wanted = list(dict.fromkeys(tenants))  # de-duplicated, first-seen order
    for tenant in wanted:
        _check_tenant(tenant, tenant_max_length)
    target = _resolve(Path(path))
    where = str(path)
    with _exclusive_lock(target, where):
        try:
            before: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            before = None
        except OSError as exc:
            raise FlagFileError(f"{where}: cannot stat flags file: {exc.strerror}") from None
        if before is None:
            if not create:
                raise FlagFileError(
                    f"{where}: flags file does not exist (create it with create=True)"
                )
            data: dict[str, Any] = {"flags": {}}
        else:
            data = read_flag_file(target)

        flag = data["flags"].get(flag_key)
        added = flag is None
        if flag is None:
            if flag_key in data.get("flagValues", {}):
                # The SDK refuses the whole file when a key is in both sections.
                raise FlagFileError(
                    f'{where}: "{flag_key}" is a simple value in "flagValues"; '
                    'move it to "flags" before routing tenants with it'
                )
            flag = data["flags"][flag_key] = new_flag(flag_key)
        index = _check_writable(flag, flag_key, value, where)
        previous = {t: _tenant_variation(data, t, flag_key, where) for t in wanted}

        changed = _move_tenants(flag, wanted, index)
        if not (changed or added or before is None):
            return previous
        if not added:
            flag["version"] += 1
        _atomic_write(target, _serialize(data, where), before, where)
        return previous


def set_tenant(
    path: Path,
    tenant: str,
    value: str,
    flag_key: str = DEFAULT_FLAG_KEY,
    create: bool = False,
    tenant_max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH,
) -> str:
    """Route one tenant to `value`; return its previous route."""
    return set_tenants(
        path,
        [tenant],
        value,
        flag_key=flag_key,
        create=create,
        tenant_max_length=tenant_max_length,
    )[tenant]


# --- validation --------------------------------------------------------------------------


def _check_value(value: object) -> None:
    if value not in FLAG_VALUES:
        raise FlagFileError(f"variation must be one of {', '.join(FLAG_VALUES)}; got {value!r}")


def _check_tenant(tenant: object, max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH) -> None:
    """FlagFileError unless `tenant` passes the router's tenant-id rule (router.domain)."""
    problem = tenant_id_problem(tenant, max_length)
    if problem is not None:
        raise FlagFileError(problem)


def _check_writable(flag: dict[str, Any], flag_key: str, value: str, where: str) -> int:
    """Validate what the SDK needs of the flag we rewrite; return the index of `value`."""
    name = f'{where}: flag "{flag_key}"'
    if flag.get("key") != flag_key:
        # The SDK stores a flag under its "key" field, not under its name in the file.
        raise FlagFileError(f'{name} has "key" {flag.get("key")!r}; they must match')
    if flag.get("deleted") is True:
        raise FlagFileError(f"{name} is marked deleted")
    if flag.get("on") is not True:
        # Off, the SDK serves offVariation to everyone: targets would change nothing.
        raise FlagFileError(f'{name} is off ("on" is not true); targeting would have no effect')
    version = flag.get("version", 1)  # the SDK reads a missing version as 1
    if type(version) is not int or version < 1:
        raise FlagFileError(f'{name} has "version" {version!r}; expected a positive integer')
    flag["version"] = version
    variations = flag.get("variations")
    if not isinstance(variations, list) or value not in variations:
        raise FlagFileError(f'{name} has no variation "{value}" (variations: {variations!r})')
    targets = flag.setdefault("contextTargets", [])
    if not isinstance(targets, list):
        raise FlagFileError(f'{name}: "contextTargets" must be a list')
    for entry in targets:
        if not (
            isinstance(entry, dict)
            and type(entry.get("variation")) is int
            and isinstance(entry.get("values"), list)
            and all(isinstance(v, str) for v in entry["values"])
        ):
            raise FlagFileError(
                f"{name} has a malformed contextTargets entry {entry!r}: "
                'expected {"contextKind", "variation": int, "values": [str]}'
            )
    return variations.index(value)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last duplicate silently; in a hand-edited flags file that hides which
    # entry was meant, so refuse instead of guessing.
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in one JSON object")
        result[key] = item
    return result


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


# --- evaluation and mutation -------------------------------------------------------------


def _tenant_variation(data: dict[str, Any], tenant: str, flag_key: str, where: str) -> str:
    flags = data.get("flags")
    if not isinstance(flags, dict):
        raise FlagFileError(f'{where}: no "flags" object at the top level')
    flag = flags.get(flag_key)
    if not isinstance(flag, dict) or flag.get("deleted") is True:
        return DEFAULT_FLAG_VALUE
    name = f'{where}: flag "{flag_key}"'
    if flag.get("on") is not True:
        off = flag.get("offVariation")
        return DEFAULT_FLAG_VALUE if off is None else _variation_at(flag, off, name)
    if flag.get("prerequisites"):
        raise FlagFileError(f"{name} has prerequisites; its routes depend on other flags")
    for entry in flag.get("contextTargets") or []:
        if (
            isinstance(entry, dict)
            and entry.get("contextKind") == CONTEXT_KIND
            and isinstance(entry.get("values"), list)
            and tenant in entry["values"]
        ):
            return _variation_at(flag, entry.get("variation"), name)
    if flag.get("rules"):
        raise FlagFileError(f"{name} has rules; the route of an untargeted tenant needs the SDK")
    fallthrough = flag.get("fallthrough") or {}
    if "variation" not in fallthrough:
        raise FlagFileError(f"{name} has a rollout fallthrough; no single route per tenant")
    return _variation_at(flag, fallthrough["variation"], name)


def _variation_at(flag: dict[str, Any], index: object, name: str) -> str:
    variations = flag.get("variations")
    if type(index) is not int or not isinstance(variations, list):
        raise FlagFileError(f"{name}: variation index {index!r} is not usable")
    if not 0 <= index < len(variations):
        raise FlagFileError(f"{name}: variation index {index} out of range")
    value = variations[index]
    return value if value in FLAG_VALUES else DEFAULT_FLAG_VALUE


def _move_tenants(flag: dict[str, Any], tenants: list[str], index: int) -> bool:
    """Put each tenant in the `tenant` target list for `index` and in no other; True if
    anything moved. Sets, because bulk moves touch thousands of ids in lists as long."""
    entries = [e for e in flag["contextTargets"] if e.get("contextKind") == CONTEXT_KIND]
    dest = next((e for e in entries if e["variation"] == index), None)
    if dest is None:
        dest = {"contextKind": CONTEXT_KIND, "variation": index, "values": []}
        flag["contextTargets"].append(dest)
        entries.append(dest)
    members = {id(e): set(e["values"]) for e in entries}
    changed = False
    for tenant in tenants:
        for entry in entries:
            held = members[id(entry)]
            if entry is dest and tenant not in held:
                held.add(tenant)
                changed = True
            elif entry is not dest and tenant in held:
                held.discard(tenant)
                changed = True
    if changed:
        for entry in entries:
            entry["values"] = sorted(members[id(entry)])
    return changed


# --- writing -----------------------------------------------------------------------------


def _resolve(path: Path) -> Path:
    # The SDK polls os.path.realpath(path), resolved once at start. os.replace onto a
    # symlink would replace the link itself and leave the polled target unchanged forever.
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def _exclusive_lock(target: Path, where: str) -> Iterator[None]:
    # flock (not fcntl/lockf record locks): it belongs to the open file description, so it
    # also excludes other threads of this process, and the kernel drops it if we die.
    # The lock file is never deleted: unlinking it would let two writers lock two inodes.
    lock_path = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise FlagFileError(f"{where}: cannot open lock file {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _serialize(data: dict[str, Any], where: str) -> bytes:
    try:
        # ensure_ascii=False: PyYAML, which the SDK parses with when it is installed, turns
        # the \ud83d\ude00 surrogate pairs json writes for non-BMP characters into two lone
        # surrogates; literal UTF-8 it reads correctly. allow_nan=False: NaN is not JSON.
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        payload = text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise FlagFileError(f"{where}: cannot serialise the flags: {exc}") from None
    _check_sdk_reads_back(text, data, where)
    return payload


def _check_sdk_reads_back(text: str, data: dict[str, Any], where: str) -> None:
    """Refuse to write a file the SDK would read differently from what we meant.

    With PyYAML installed the SDK parses the JSON as YAML 1.1, which reads some valid JSON
    differently: `1e-07` or `1e+16` (how json writes those floats) are strings there, and
    literal U+0085/U+2028 inside a string are folded as line breaks. Such values can only
    come from other flags in the file; better an error than silently changing them.
    """
    try:
        import yaml
    except ImportError:  # the SDK then uses json.loads: it reads back what json wrote
        return
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same resolver, ten times faster
    try:
        parsed = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise FlagFileError(
            f"{where}: the SDK's YAML parser would reject the file: {exc}"
        ) from None
    if parsed != data:
        at = _first_difference(data, parsed, "")
        raise FlagFileError(
            f"{where}: not written: the SDK (parsing JSON as YAML 1.1) would read {at} "
            "differently; write that value another way (e.g. 0.0000001 as a decimal string)"
        )


def _first_difference(a: Any, b: Any, at: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{at}/{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{at}/{i}")
    return f"{at or '/'} ({a!r} as {b!r})"


def _atomic_write(target: Path, payload: bytes, before: os.stat_result | None, where: str) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        # 0o666 minus the umask: a new file gets the mode open() would give it. An existing
        # file's mode (and owner, when we may) is copied so the router can still read it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise FlagFileError(f"{where}: cannot create temp file {tmp}: {exc.strerror}") from None
    try:
        try:
            if before is not None:
                os.fchmod(fd, stat.S_IMODE(before.st_mode))
                _copy_owner(fd, before)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            _advance_mtime(fd, before)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FlagFileError(f"{where}: cannot write flags file: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent, where)


def _copy_owner(fd: int, before: os.stat_result) -> None:
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) != (before.st_uid, before.st_gid):
        # Only root may give a file away; anyone else keeps its own ownership.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, before.st_uid, before.st_gid)


def _advance_mtime(fd: int, before: os.stat_result | None) -> None:
    """Make the new file's mtime later than the old one's.

    The SDK's poller reloads only when getmtime() differs from its last poll. Kernels
    before 6.13 stamp files from a clock that ticks every few milliseconds, so two writes
    in one tick (or a clock stepped back) can give the same mtime and the SDK would miss
    the second write for good. 1 us is above the float resolution of getmtime() today
    (about 0.24 us); the larger steps cover file systems with coarse timestamps.
    """
    if before is None:
        return
    for step_ns in (1_000, 1_000_000, 1_000_000_000, 2_000_000_000):
        now = os.fstat(fd)
        if now.st_mtime_ns > before.st_mtime_ns:
            return
        os.utime(fd, ns=(now.st_atime_ns, before.st_mtime_ns + step_ns))


def _fsync_dir(directory: Path, where: str) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FlagFileError(f"{where}: cannot open directory to sync: {exc.strerror}") from None
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot
            raise FlagFileError(f"{where}: cannot sync directory: {exc.strerror}") from None
    finally:
        os.close(fd)
