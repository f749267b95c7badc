"""`router cutover` end to end: two real router processes share one flag file, demo
backends answer with their side, and the CLI runs as a subprocess, as an SRE runs it.

The core test keeps a steady stream of requests for the tenant going through both routers
while the cutover runs, and checks the property the cutover exists for: every request is
answered, each by exactly one side, every legacy answer completes before the flag says
new, and nothing reaches new before that (docs/design.md, "Hold and cutover": during a
cutover a tenant's writes never land on both sides).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.control.cutover import check_replication
from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from tests.support.net import free_port
from tests.support.procs import (
    ROUTER,
    Procs,
    RouterProc,
    request,
    run_router,
    start_fleet,
)
from tests.support.waiting import wait_until

TOKEN = "cutover-test-admin-token"
STEPS = ["preflight", "hold", "drain", "new", "verify"]


@dataclass
class Fleet:
    routers: list[RouterProc]
    flags: Path
    tmp: Path

    @property
    def admins(self) -> list[str]:
        args: list[str] = []
        for router in self.routers:
            args += ["--admin", f"http://127.0.0.1:{router.admin_port}"]
        return args

    def view(self, router: RouterProc, tenant: str) -> dict[str, Any]:
        response = request(
            router.admin_port,
            f"/admin/tenants/{tenant}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        assert response.status == 200, response.body
        body: dict[str, Any] = response.json()
        return body

    def flag(self, tenant: str) -> str:
        return tenant_variation(read_flag_file(self.flags), tenant)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two demo backends and TWO routers reading the same flag file (each its own ledger,
    as separate ECS tasks have), all real processes, shared by the module's tests: each
    test moves tenants of its own."""
    tmp = tmp_path_factory.mktemp("cutover")
    flags = tmp / "flags.json"
    set_tenants(flags, ["acme", "initech", "hooli", "umbrella", "wayne"], "legacy", create=True)
    set_tenants(flags, ["globex"], "new")
    with Procs() as procs:
        routers = start_fleet(procs, tmp, flags, TOKEN)
        yield Fleet(routers, flags, tmp)


def cutover(fleet: Fleet, tenant: str, *args: str, **env: str) -> Any:
    return run_router(
        "cutover",
        tenant,
        "--flags-file",
        str(fleet.flags),
        *fleet.admins,
        *args,
        env={"ROUTER_ADMIN_TOKEN": TOKEN, **env},
        timeout=90,
    )


def as_json(completed: Any) -> dict[str, Any]:
    assert completed.stdout.strip(), completed.stderr
    doc: dict[str, Any] = json.loads(completed.stdout)
    return doc


# ---- traffic ----------------------------------------------------------------------------


@dataclass
class Answer:
    sent: float  # wall clock, as the cutover's step timestamps
    received: float
    status: int
    side: str | None  # the demo backend's answer (body), checked against its header
    router: int
    error: str | None = None


class Traffic:
    """Requests for one tenant, back to back on `threads` threads, spread over every
    router; each answer recorded with its send and receive times."""

    def __init__(
        self, fleet: Fleet, tenant: str, threads: int = 4, path: str = "/__demo/slow/0.05"
    ) -> None:
        self.fleet = fleet
        self.tenant = tenant
        self.path = path
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)
            assert not thread.is_alive(), "a traffic thread hung"
        return self.answers

    def wait_for(self, count: int) -> None:
        wait_until(lambda: len(self.answers) >= count, timeout=10, what=f"{count} answers")

    def _loop(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            which = n % len(self.fleet.routers)
            n += 1
            router = self.fleet.routers[which]
            sent = time.time()
            try:
                response = router.get(self.path, tenant=self.tenant, timeout=30)
            except OSError as exc:
                answer = Answer(sent, time.time(), 0, None, which, repr(exc))
            else:
                side = None
                error = None
                if response.status == 200:
                    side = response.json()["side"]
                    if response.headers["X-Backend-Side"] != side:
                        error = "header and body disagree on the side"
                answer = Answer(sent, time.time(), response.status, side, which, error)
            with self._lock:
                self.answers.append(answer)


# ---- the cutover under load -------------------------------------------------------------


def test_cutover_under_steady_traffic_through_two_routers(fleet: Fleet) -> None:
    tenant = "acme"
    before = read_flag_file(fleet.flags)["flags"]["tenant-routing"]["version"]
    with Traffic(fleet, tenant) as traffic:
        traffic.wait_for(20)  # steady state on legacy first
        completed = cutover(fleet, tenant, "--json")
        count = len(traffic.answers)
        traffic.wait_for(count + 20)  # and a while on new after
    answers = traffic.answers

    assert completed.returncode == 0, completed.stdout + completed.stderr
    doc = as_json(completed)
    steps = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert all(s["ok"] for s in doc["steps"]), doc["steps"]
    for step in doc["steps"]:
        assert step["elapsed_ms"] >= 0 and step["detail"]
        assert step["started_at"] <= step["ended_at"]
    assert doc["result"] == {
        "ok": True,
        "outcome": "moved",
        "reason": "",
        "flag": "new",
        "flag_writes": ["hold", "new"],
        "advice": "",
    }
    assert doc["total_ms"] >= sum(s["elapsed_ms"] for s in doc["steps"]) - 1
    # Exactly two flag writes: hold, then new.
    assert read_flag_file(fleet.flags)["flags"]["tenant-routing"]["version"] == before + 2
    assert fleet.flag(tenant) == "new"

    # Zero failed requests, each answered by exactly one side.
    failures = [a for a in answers if a.status != 200 or a.error or a.side is None]
    assert failures == [], failures[:5]
    assert {a.router for a in answers} == {0, 1}

    hold_written = steps["hold"]["started_at"]
    drained = steps["drain"]["ended_at"]
    new_written = steps["new"]["started_at"]
    verified = steps["verify"]["ended_at"]
    legacy = [a for a in answers if a.side == "legacy"]
    new = [a for a in answers if a.side == "new"]
    # Before the hold: legacy. After every router confirmed new: new.
    assert all(a.side == "legacy" for a in answers if a.received < hold_written)
    assert all(a.side == "new" for a in answers if a.sent > verified)
    # Never both at once: every legacy answer was sent before the drain ended and complete
    # before the flag said new; nothing reached new before the flag said so.
    late = [a for a in legacy if not (a.sent < drained and a.received < new_written)]
    assert late == [], late
    early = [a for a in new if a.received < new_written]
    assert early == [], early
    # The hold did something: requests sent while it was on waited and were answered by new.
    held = [a for a in new if hold_written < a.sent < new_written]
    assert held, "no request was held during the cutover"
    assert len(legacy) >= 20 and len(new) >= 20

    for router in fleet.routers:
        view = fleet.view(router, tenant)
        assert (view["target"], view["reason"], view["ledgered"]) == ("new", "flag", True)
        assert view["inflight"]["legacy"] == 0


def test_human_output_has_one_line_per_step(fleet: Fleet) -> None:
    completed = cutover(fleet, "initech")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("cutover initech: flags file ")
    assert "2 router(s)" in lines[0]
    for line, name in zip(lines[1:6], STEPS, strict=True):
        assert line.lstrip().startswith(f"✓ {name} "), line
        assert " ms  " in line
    assert lines[6].startswith("✓ initech moved to new in ")
    assert fleet.flag("initech") == "new"


# ---- failures ---------------------------------------------------------------------------


def test_a_failing_replication_check_rolls_back_to_legacy(fleet: Fleet) -> None:
    tenant = "hooli"
    marker = fleet.tmp / "replication-checked-once"
    # Caught up at preflight (the first run), behind after the drain (every later run).
    check = (
        f'test "$TENANT" = {tenant} || exit 3; '
        f'if [ -e {marker} ]; then echo "lag 42 s"; exit 1; fi; touch {marker}; echo ok'
    )
    with Traffic(fleet, tenant, threads=2) as traffic:
        traffic.wait_for(10)
        completed = cutover(
            fleet,
            tenant,
            "--json",
            "--replication-check",
            check,
            "--replication-timeout",
            "0.6",
        )
        count = len(traffic.answers)
        traffic.wait_for(count + 10)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    doc = as_json(completed)
    assert [(s["name"], s["ok"]) for s in doc["steps"]] == [
        ("preflight", True),
        ("hold", True),
        ("drain", True),
        ("replication", False),
        ("rollback", True),
    ]
    assert "replication caught up" in doc["steps"][0]["detail"]
    assert "lag 42 s" in doc["steps"][3]["detail"]
    result = doc["result"]
    assert result["ok"] is False and result["outcome"] == "rolled-back"
    assert result["reason"].startswith("replication: replication not caught up")
    assert result["flag_writes"] == ["hold", "legacy"]
    assert fleet.flag(tenant) == "legacy"
    # Nothing was ever served by new; the held requests went back to legacy.
    answers = traffic.answers
    assert all(a.status == 200 and a.side == "legacy" for a in answers), [
        a for a in answers if a.side != "legacy"
    ][:5]
    for router in fleet.routers:
        view = fleet.view(router, tenant)
        assert (view["target"], view["ledgered"]) == ("legacy", False)


class Slow:
    """One long request for the tenant, on a thread: it holds a legacy slot in flight."""

    def __init__(self, router: RouterProc, tenant: str, seconds: float) -> None:
        self.answer: Any = None
        self.thread = threading.Thread(
            target=lambda: setattr(
                self, "answer", router.get(f"/__demo/slow/{seconds}", tenant=tenant, timeout=30)
            )
        )
        self.thread.start()

    def join(self) -> Any:
        self.thread.join(timeout=30)
        return self.answer


def wait_inflight(fleet: Fleet, tenant: str) -> None:
    wait_until(
        lambda: any(fleet.view(r, tenant)["inflight"]["legacy"] for r in fleet.routers),
        timeout=10,
        what="a legacy request in flight",
    )


def test_a_drain_that_times_out_rolls_back(fleet: Fleet) -> None:
    tenant = "stark"
    slow = Slow(fleet.routers[0], tenant, 3)
    wait_inflight(fleet, tenant)
    completed = cutover(fleet, tenant, "--json", "--drain-timeout", "0.5")
    assert completed.returncode == 1, completed.stdout + completed.stderr
    doc = as_json(completed)
    assert [(s["name"], s["ok"]) for s in doc["steps"]] == [
        ("preflight", True),
        ("hold", True),
        ("drain", False),
        ("rollback", True),
    ]
    assert "1 legacy in flight" in doc["steps"][2]["detail"]
    assert doc["result"]["outcome"] == "rolled-back"
    assert fleet.flag(tenant) == "legacy"
    answer = slow.join()
    assert answer.status == 200 and answer.json()["side"] == "legacy"


def test_sigint_during_the_drain_rolls_back(fleet: Fleet) -> None:
    tenant = "tyrell"
    slow = Slow(fleet.routers[1], tenant, 3)
    wait_inflight(fleet, tenant)
    with Procs() as procs:
        proc = procs.start(
            [
                *ROUTER,
                "cutover",
                tenant,
                "--flags-file",
                str(fleet.flags),
                *fleet.admins,
                "--json",
            ],
            env={"ROUTER_ADMIN_TOKEN": TOKEN},
            name="cutover",
        )
        wait_until(lambda: fleet.flag(tenant) == "hold", timeout=15, what="hold", proc=proc)
        time.sleep(0.2)  # in the drain, waiting for the slow legacy request
        proc.signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, proc.output()
        doc = json.loads("\n".join(proc.stdout))
    assert [(s["name"], s["ok"]) for s in doc["steps"]] == [
        ("preflight", True),
        ("hold", True),
        ("drain", False),
        ("rollback", True),
    ]
    assert doc["steps"][2]["detail"] == "interrupted"
    assert fleet.flag(tenant) == "legacy"
    answer = slow.join()
    assert answer.status == 200 and answer.json()["side"] == "legacy"


def test_an_unreachable_admin_fails_preflight_and_changes_nothing(fleet: Fleet) -> None:
    before = fleet.flags.read_bytes()
    dead = f"http://127.0.0.1:{free_port()}"
    completed = cutover(fleet, "umbrella", "--json", "--admin", dead)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    doc = as_json(completed)
    assert [(s["name"], s["ok"]) for s in doc["steps"]] == [("preflight", False)]
    assert dead in doc["steps"][0]["detail"] and "unreachable" in doc["steps"][0]["detail"]
    assert doc["result"]["outcome"] == "refused"
    assert doc["result"]["flag_writes"] == []
    assert fleet.flags.read_bytes() == before


def test_a_wrong_admin_token_fails_preflight(fleet: Fleet) -> None:
    before = fleet.flags.read_bytes()
    completed = cutover(fleet, "umbrella", ROUTER_ADMIN_TOKEN="not-the-token")
    assert completed.returncode == 1
    assert "✗ preflight" in completed.stdout
    assert "unauthorized" in completed.stdout
    assert "not-the-token" not in completed.stdout + completed.stderr
    assert fleet.flags.read_bytes() == before


def test_a_tenant_already_on_new_exits_0_without_changes(fleet: Fleet) -> None:
    before = fleet.flags.read_bytes()
    completed = cutover(fleet, "globex", "--json")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    doc = as_json(completed)
    assert [s["name"] for s in doc["steps"]] == ["preflight"]
    assert "already on new" in doc["steps"][0]["detail"]
    assert doc["result"]["outcome"] == "already-new"
    assert doc["result"]["flag_writes"] == []
    assert fleet.flags.read_bytes() == before


def test_a_tenant_left_in_hold_is_refused_unless_resumed(fleet: Fleet) -> None:
    tenant = "umbrella"
    set_tenants(fleet.flags, [tenant], "hold")  # a cutover that died after its first write
    before = fleet.flags.read_bytes()
    refused = cutover(fleet, tenant, "--json")
    assert refused.returncode == 1
    doc = as_json(refused)
    assert doc["result"]["outcome"] == "refused"
    assert "stopped midway" in doc["result"]["reason"]
    assert "--resume-hold" in doc["result"]["advice"]
    assert fleet.flags.read_bytes() == before

    resumed = cutover(fleet, tenant, "--json", "--resume-hold")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    doc = as_json(resumed)
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert "already hold" in doc["steps"][1]["detail"]
    assert doc["result"]["flag_writes"] == ["new"]
    assert fleet.flag(tenant) == "new"


def test_a_ledgered_tenant_whose_flag_says_legacy_is_refused(fleet: Fleet) -> None:
    tenant = "wayne"
    set_tenants(fleet.flags, [tenant], "new")
    router = fleet.routers[0]
    wait_until(lambda: fleet.view(router, tenant)["target"] == "new", timeout=10)
    assert router.get("/x", tenant=tenant).json()["side"] == "new"  # ledgered now
    set_tenants(fleet.flags, [tenant], "legacy")  # someone flipped it back by hand
    before = fleet.flags.read_bytes()
    completed = cutover(fleet, tenant)
    assert completed.returncode == 1
    assert "ratchet ledger" in completed.stdout
    assert "next: " in completed.stdout
    assert fleet.flags.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "say where the flag is"),
        (("--ld-project", "p", "--ld-environment", "e"), {}, "LAUNCHDARKLY_API_TOKEN"),
        (("--ld-project", "p"), {"LAUNCHDARKLY_API_TOKEN": "x"}, "go together"),
        (("--flags-file", "FLAGS", "--admin", "ftp://x"), {}, "--admin must be"),
        (("--flags-file", "/no/such/file"), {}, "no such file"),
        (
            ("--flags-file", "FLAGS", "--ld-project", "p", "--ld-environment", "e"),
            {"LAUNCHDARKLY_API_TOKEN": "x"},
            "not both",
        ),
    ],
)
def test_usage_errors_exit_2(
    fleet: Fleet, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    args = tuple(str(fleet.flags) if a == "FLAGS" else a for a in args)
    completed = run_router(
        "cutover",
        "acme",
        *args,
        "--admin",
        "http://127.0.0.1:1",
        env={"ROUTER_ADMIN_TOKEN": TOKEN, **env},
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert message in completed.stderr


def test_missing_admin_token_exits_2(fleet: Fleet) -> None:
    completed = run_router(
        "cutover", "acme", "--flags-file", str(fleet.flags), "--admin", "http://127.0.0.1:1"
    )
    assert completed.returncode == 2
    assert "ROUTER_ADMIN_TOKEN is not set" in completed.stderr


# ---- the replication check --------------------------------------------------------------


async def test_replication_check_by_command(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        ok = await check_replication('echo "tenant $TENANT fine"', "acme", 0, 5, client)
        assert ok == (True, "caught up (command exit 0): tenant acme fine")
        behind = await check_replication("echo behind >&2; exit 4", "acme", 0, 5, client)
        assert behind == (False, "not caught up (command exit 4): behind")
        started = time.monotonic()
        slow = await check_replication(f"sleep 0.6; touch {tmp_path}/x", "acme", 0, 0.2, client)
        assert slow == (False, "replication check command timed out after 0.2 s")
        assert time.monotonic() - started < 0.55
    await asyncio.sleep(1.0)
    assert not (tmp_path / "x").exists()  # the shell and its children were stopped
