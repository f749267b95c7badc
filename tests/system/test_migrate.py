"""`router migrate` end to end: real routers, a shared flag file, the CLI as a subprocess,
interrupted (SIGINT) and crashed (SIGKILL) midway, then resumed from its journal.

"Exactly once" is checked from two sides: the journal records every flag write the run
made (one `hold` and one `new` per moved tenant, never more), and the flag file's final
state has every tenant on new.
"""

from __future__ import annotations

import json
import random
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from tests.support.procs import (
    ROUTER,
    Procs,
    RouterProc,
    request,
    run_router,
    start_fleet,
)
from tests.support.waiting import wait_until

TOKEN = "migrate-test-admin-token"
PRE_MOVED = {"t05", "t13"}  # already on new before the run


class Fleet:
    def __init__(self, procs: Procs, routers: list[RouterProc], tmp: Path) -> None:
        self.procs = procs
        self.routers = routers
        self.tmp = tmp

    def admins(self) -> list[str]:
        args: list[str] = []
        for router in self.routers:
            args += ["--admin", f"http://127.0.0.1:{router.admin_port}"]
        return args

    def target(self, router: RouterProc, tenant: str) -> str:
        response = request(
            router.admin_port,
            f"/admin/tenants/{tenant}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status == 200, response.body
        target: str = response.json()["target"]
        return target


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two routers and two demo backends; every test writes a flag file of its own at
    `tmp/flags.json` (the routers' file) before it starts."""
    tmp = tmp_path_factory.mktemp("migrate")
    flags = tmp / "flags.json"
    set_tenants(flags, ["seed"], "legacy", create=True)
    with Procs() as procs:
        routers = start_fleet(procs, tmp, flags, TOKEN)
        yield Fleet(procs, routers, tmp)


def journal_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flag_of(flags: Path, tenant: str) -> str:
    return tenant_variation(read_flag_file(flags), tenant)


def write_tenants(path: Path, tenants: dict[str, int]) -> None:
    lines = ["# tenant,size (rows) -- smallest first", ""]
    order = list(tenants)
    random.Random(7).shuffle(order)
    lines += [f"{t},{tenants[t]}" for t in order]
    path.write_text("\n".join(lines) + "\n")


def migrate_argv(fleet: Fleet, tenants: Path, journal: Path, *args: str) -> list[str]:
    return [
        "migrate",
        "--tenants",
        str(tenants),
        "--flags-file",
        str(fleet.tmp / "flags.json"),
        *fleet.admins(),
        "--journal",
        str(journal),
        *args,
    ]


# ---- interrupted, then resumed ----------------------------------------------------------


def test_migrate_interrupted_then_resumed_moves_every_tenant_exactly_once(fleet: Fleet) -> None:
    flags = fleet.tmp / "flags.json"
    names = [f"t{i:02d}" for i in range(20)]
    sizes = dict(zip(names, random.Random(3).sample(range(1, 1000), 20), strict=True))
    set_tenants(flags, names, "legacy")
    set_tenants(flags, sorted(PRE_MOVED), "new")
    version = read_flag_file(flags)["flags"]["tenant-routing"]["version"]
    tenants = fleet.tmp / "tenants-a.csv"
    write_tenants(tenants, sizes)
    journal = fleet.tmp / "a.journal"
    by_size = sorted(names, key=lambda t: sizes[t])

    # Run 1: rate-limited to 300 starts a minute (one per 0.2 s) so SIGINT lands midway.
    args = ["--concurrency", "4", "--rate", "300", "--progress-interval", "0.5"]
    first = fleet.procs.start(
        [*ROUTER, *migrate_argv(fleet, tenants, journal, *args)],
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        name="migrate",
    )
    wait_until(
        lambda: (
            journal.exists() and sum(r["event"] == "done" for r in journal_records(journal)) >= 6
        ),
        timeout=30,
        what="6 tenants done",
        proc=first,
    )
    first.signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130, first.output()
    out = "\n".join(first.stdout)
    assert "stopped early: interrupted (SIGINT)" in out
    assert "starting no more cutovers" in "\n".join(first.stderr)
    assert any(line.startswith("progress: [") and "ETA" in line for line in first.stderr)

    records = journal_records(journal)
    assert records[0]["event"] == "run"
    assert records[-1]["event"] == "end" and records[-1]["interrupted"] is True
    started = [r["tenant"] for r in records if r["event"] == "started"]
    finished = {r["tenant"]: r for r in records if r["event"] in ("done", "failed")}
    assert set(started) == set(finished), "SIGINT must let running cutovers finish"
    assert all(r["event"] == "done" for r in finished.values())
    assert 6 <= len(started) < 20
    assert started == by_size[: len(started)]  # smallest first
    for tenant in names:
        expected = "new" if tenant in finished or tenant in PRE_MOVED else "legacy"
        assert flag_of(flags, tenant) == expected, tenant
    summary_first = records[-1]
    assert summary_first["not_started"] == 20 - len(started)

    # Run 2: the same command resumes: nothing done is redone, nothing is skipped.
    second = run_router(
        *migrate_argv(fleet, tenants, journal, "--concurrency", "4"),
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        timeout=120,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"done earlier    {len(started)} (journal)" in second.stdout
    assert "failed          0" in second.stdout
    assert "mean cutover " in second.stdout

    records = journal_records(journal)
    runs = [i for i, r in enumerate(records) if r["event"] == "run"]
    assert len(runs) == 2
    second_started = [r["tenant"] for r in records[runs[1] :] if r["event"] == "started"]
    assert not set(second_started) & set(started)
    assert started + second_started == by_size  # every tenant once, smallest first
    writes = Counter((r["tenant"], r["value"]) for r in records if r["event"] == "flag")
    for tenant in names:
        want = 0 if tenant in PRE_MOVED else 1
        assert writes[(tenant, "hold")] == want, tenant
        assert writes[(tenant, "new")] == want, tenant
        assert writes[(tenant, "legacy")] == 0, tenant
        assert flag_of(flags, tenant) == "new"
        for router in fleet.routers:
            assert fleet.target(router, tenant) == "new"
    delta = read_flag_file(flags)["flags"]["tenant-routing"]["version"] - version
    assert delta == 2 * (20 - len(PRE_MOVED)) == sum(writes.values())
    outcomes = Counter(r["outcome"] for r in records if r["event"] == "done")
    assert outcomes == {"moved": 18, "already-new": 2}
    end = records[-1]
    assert end["event"] == "end" and end["interrupted"] is False
    assert end["moved"] + end["already_new"] + end["done_before"] == 20


# ---- crashed mid-cutover, then resumed --------------------------------------------------


def test_migrate_resumes_a_tenant_left_in_hold_by_a_crash(fleet: Fleet) -> None:
    flags = fleet.tmp / "flags.json"
    names = [f"c{i}" for i in range(6)]
    set_tenants(flags, names, "legacy")
    version = read_flag_file(flags)["flags"]["tenant-routing"]["version"]
    tenants = fleet.tmp / "tenants-c.txt"
    tenants.write_text("\n".join(names) + "\n")  # no sizes: file order
    journal = fleet.tmp / "c.journal"
    # The replication check keeps every cutover in hold for a second after its drain.
    args = ["--concurrency", "2", "--replication-check", "sleep 1", "--replication-timeout", "5"]
    crashing = fleet.procs.start(
        [*ROUTER, *migrate_argv(fleet, tenants, journal, *args)],
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        name="migrate",
    )

    def in_hold() -> list[str]:
        if not journal.exists():
            return []
        last: dict[str, str] = {}
        for r in journal_records(journal):
            if r["event"] == "flag":
                last[r["tenant"]] = r["value"]
        return [t for t, v in last.items() if v == "hold"]

    wait_until(in_hold, timeout=30, what="a tenant in hold", proc=crashing)
    crashing.signal(signal.SIGKILL)  # no cleanup, no journal "end": a crash
    assert crashing.wait(timeout=10) == -signal.SIGKILL
    held = [t for t in names if flag_of(flags, t) == "hold"]
    assert held, "the crash left no tenant in hold"
    records = journal_records(journal)
    assert records[-1]["event"] != "end"

    resumed = run_router(
        *migrate_argv(fleet, tenants, journal, "--concurrency", "2"),
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = journal_records(journal)
    second = records[[i for i, r in enumerate(records) if r["event"] == "run"][1] :]
    resumes = {r["tenant"] for r in second if r["event"] == "started" and r["resume"]}
    assert set(held) <= resumes
    # Every effective write bumps the flag's version by one (a no-op write bumps nothing):
    # exactly one legacy -> hold and one hold -> new per tenant over both runs, wherever
    # the kill landed. The journal logs each write after it succeeded, so a kill between
    # a write and its journal line loses the line, never adds one.
    delta = read_flag_file(flags)["flags"]["tenant-routing"]["version"] - version
    assert delta == 2 * len(names)
    writes = Counter((r["tenant"], r["value"]) for r in records if r["event"] == "flag")
    for tenant in names:
        assert flag_of(flags, tenant) == "new", tenant
        assert writes[(tenant, "new")] <= 1, tenant
        assert writes[(tenant, "hold")] <= 1, tenant
        assert writes[(tenant, "legacy")] == 0, tenant
    assert sum(writes.values()) >= delta - 2  # at most one lost line per running cutover


# ---- dry run and bad input --------------------------------------------------------------


def test_dry_run_prints_the_plan_and_changes_nothing(fleet: Fleet) -> None:
    flags = fleet.tmp / "flags.json"
    set_tenants(flags, ["d1", "d2"], "legacy")
    set_tenants(flags, ["d3"], "new")
    tenants = fleet.tmp / "tenants-d.csv"
    tenants.write_text("d1,30\nd2,10\nd3,20\n")
    journal = fleet.tmp / "d.journal"
    before = flags.read_bytes()
    completed = run_router(
        *migrate_argv(fleet, tenants, journal, "--dry-run", "--wave-size", "2"),
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert sum(": ok: " in line for line in lines) == 2  # both routers reachable
    plan = [line for line in lines if line.startswith(("wave", "  d"))]
    assert plan == [
        "wave 1 (2 tenant(s)):",
        "  d2 size 10: flag legacy: cut over",
        "  d3 size 20: flag new: verify only (already on new)",
        "wave 2 (1 tenant(s)):",
        "  d1 size 30: flag legacy: cut over",
    ]
    assert lines[-1].endswith("nothing changed")
    assert flags.read_bytes() == before
    assert not journal.exists()


def test_a_bad_tenants_file_exits_2(fleet: Fleet) -> None:
    tenants = fleet.tmp / "bad.csv"
    tenants.write_text("ok1,5\nbad id,3\n")
    completed = run_router(
        *migrate_argv(fleet, tenants, fleet.tmp / "bad.journal"),
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
    )
    assert completed.returncode == 2
    assert f"{tenants}:2: invalid tenant id" in completed.stderr
