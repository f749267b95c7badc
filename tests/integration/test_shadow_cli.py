"""`router shadow report|reset` and the cutover's shadow gate (--require-shadow-match),
against fake routers: real aiohttp admin servers on 127.0.0.1 (a thread and loop of their
own, so the synchronous CLI can call them) that serve the /admin/shadow contract with
canned data, check the bearer token, and record every call. For the gate, each fake also
serves /admin/tenants/{id} from the flag file, so the real orchestrator really completes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from router.cli.main import main
from router.control.cutover import cutover
from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from router.control.flagwriters import FileFlagWriter
from tests.conftest import refused_url
from tests.support.procs import run_router

TOKEN = "shadow-test-token"
T0 = 1_764_600_000.0  # canned timestamps: T0 + seconds


def stats(
    compared: int,
    matched: int,
    kinds: dict[str, int] | None = None,
    *,
    headers: list[str] | None = None,
    paths: list[str] | None = None,
    first: float | None = None,
    last: float | None = None,
) -> dict[str, Any]:
    """One router's figures for one tenant, shaped as the admin contract says."""
    kinds = {"status": 0, "header": 0, "body": 0, "error": 0, **(kinds or {})}
    return {
        "shadowed": compared + 2,
        "compared": compared,
        "matched": matched,
        "mismatched": compared - matched,
        "noisy": 1,
        "incomplete": 2,
        "dropped": 3,
        "mismatch_kinds": kinds,
        "match_rate": round(matched / compared, 4) if compared else None,
        "noise": {"headers": headers or [], "json_paths": paths or []},
        "first_at": first,
        "last_at": last,
    }


def mismatch(at: float, request_id: str, tenant: str = "acme") -> dict[str, Any]:
    return {
        "at": T0 + at,
        "tenant": tenant,
        "method": "GET",
        "path": f"/orders?id={request_id}",
        "request_id": request_id,
        "kinds": ["status", "body"],
        "status": {"legacy": 200, "new": 500},
        "headers": {"content-type": {"legacy": "application/json", "new": "text/html"}},
        "body": {
            "legacy_bytes": 120,
            "new_bytes": 98,
            "diff": [f"$.total: 10 != 11 ({request_id})"],
        },
        "error": None,
    }


class FakeRouter:
    """A router's admin port: /admin/shadow (GET, DELETE) from `tenants` and `recent`,
    /admin/tenants/{id} from `flag_file` (never ledgered, nothing in flight)."""

    def __init__(self, flag_file: Path | None = None) -> None:
        self.enabled = True
        self.tenants: dict[str, dict[str, Any]] = {}
        self.recent: list[dict[str, Any]] = []
        self.status = 200  # 503: "a worker process did not answer" (same body shape)
        self.flag_file = flag_file
        self.calls: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.calls if method is None or m == method]

    def start(self) -> FakeRouter:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/admin/shadow", self._shadow)
        app.router.add_delete("/admin/shadow/{tenant}", self._reset)
        app.router.add_get("/admin/tenants/{tenant}", self._tenant)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(app), self._loop).result(5)
        return self

    async def _serve(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    def _workers(self) -> dict[str, int]:
        return {"answered": 1, "missing": 1 if self.status == 503 else 0}

    async def _shadow(self, request: web.Request) -> web.Response:
        tenant = request.query.get("tenant")
        limit = int(request.query.get("limit", "50"))
        if tenant is not None and (not tenant or " " in tenant):
            return web.json_response({"error": "bad_request", "detail": "tenant"}, status=400)
        tenants = {t: s for t, s in self.tenants.items() if tenant is None or t == tenant}
        recent = [r for r in self.recent if tenant is None or r["tenant"] == tenant]
        recent.sort(key=lambda r: r["at"], reverse=True)
        body = {
            "enabled": self.enabled,
            "tenants": tenants,
            "recent": recent[:limit],
            "workers": self._workers(),
        }
        return web.json_response(body, status=self.status)

    async def _reset(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        self.tenants.pop(tenant, None)
        self.recent = [r for r in self.recent if r["tenant"] != tenant]
        body = {"tenant": tenant, "reset": True, "workers": self._workers()}
        return web.json_response(body, status=self.status)

    async def _tenant(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        assert self.flag_file is not None
        target = tenant_variation(read_flag_file(self.flag_file), tenant)
        return web.json_response(
            {
                "tenant": tenant,
                "target": target,
                "reason": "flag",
                "inflight": {"legacy": 0, "new": 0},
                "held": 0,
                "ledgered": False,
            }
        )


@pytest.fixture
def flags(tmp_path: Path) -> Path:
    """acme and initech on legacy, globex on new."""
    path = tmp_path / "flags.json"
    set_tenants(path, ["acme", "initech"], "legacy", create=True)
    set_tenants(path, ["globex"], "new")
    return path


@pytest.fixture
def fakes(flags: Path) -> Iterator[list[FakeRouter]]:
    """Two fake routers."""
    started = [FakeRouter(flags).start() for _ in range(2)]
    yield started
    for fake in started:
        fake.stop()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The token in the environment; no config or ROUTER_* override from the machine (the
    working directory has no config/router.yaml)."""
    for name in ("ROUTER_CONFIG", "ROUTER_ADMIN_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def admin_args(fakes: list[FakeRouter]) -> list[str]:
    return [arg for fake in fakes for arg in ("--admin", fake.url)]


def two_routers_of_data(fakes: list[FakeRouter]) -> None:
    """acme: 600 compared, 597 matched on one; 400 and 395 on the other: 992 of 1000 (the
    mean of the two routers' rates, 99.125 %, would be wrong). globex is noise."""
    a, b = fakes
    a.tenants["acme"] = stats(
        600,
        597,
        {"status": 1, "body": 2},
        headers=["date"],
        paths=["$.ts"],
        first=T0 + 1000,
        last=T0 + 2000,
    )
    a.tenants["globex"] = stats(50, 10)
    a.recent = [mismatch(at, f"a-{at}") for at in (1500, 1400, 1100)]
    a.recent.append(mismatch(1600, "globex-1", tenant="globex"))
    b.tenants["acme"] = stats(
        400,
        395,
        {"body": 4, "error": 1},
        headers=["x-trace", "date"],
        first=T0 + 900,
        last=T0 + 2100,
    )
    b.recent = [mismatch(at, f"b-{at}") for at in (1450, 1300)]


# ---- router shadow report ---------------------------------------------------------------


def test_report_sums_routers_recomputes_the_rate_and_merges_newest_first(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    two_routers_of_data(fakes)
    code, out, err = run(capsys, "shadow", "report", "acme", *admin_args(fakes), "--limit", "4")
    assert code == 0, err
    assert err == ""
    assert "2 of 2 router(s) answered" in out
    assert "PARTIAL" not in out
    assert "99.20 % (992 of 1000 compared)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["shadowed"].split()[1] == "1004"
    assert lines["mismatched"].endswith("8 (status 1, header 0, body 6, error 1)")
    assert lines["dropped"].split()[1] == "6"
    assert lines["noisy"].split()[1] == "2"
    assert lines["incomplete"].split()[1] == "4"
    assert "headers date, x-trace; json paths $.ts" in out
    # newest first over both routers, 4 at most; another tenant's never
    ids = [w for line in out.splitlines() for w in line.split() if w[:2] in ("a-", "b-")]
    assert ids == ["a-1500", "b-1450", "a-1400", "b-1300"]
    assert "globex" not in out
    assert "legacy 200 -> new 500" in out
    assert "content-type: legacy 'application/json' -> new 'text/html'" in out
    assert "$.total: 10 != 11 (a-1500)" in out
    for fake in fakes:
        assert fake.calls == [("GET", "/admin/shadow", {"tenant": "acme", "limit": "4"})]


def test_report_json_is_the_merged_view(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    two_routers_of_data(fakes)
    code, out, _ = run(capsys, "shadow", "report", "acme", *admin_args(fakes), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["tenant"] == "acme" and doc["complete"] is True and doc["enabled"] is True
    assert (doc["compared"], doc["matched"], doc["mismatched"]) == (1000, 992, 8)
    assert doc["match_rate"] == 0.992
    assert doc["mismatch_kinds"] == {"status": 1, "header": 0, "body": 6, "error": 1}
    assert doc["noise"] == {"headers": ["date", "x-trace"], "json_paths": ["$.ts"]}
    assert (doc["first_at"], doc["last_at"]) == (T0 + 900, T0 + 2100)
    assert [r["request_id"] for r in doc["recent"]] == [
        "a-1500",
        "b-1450",
        "a-1400",
        "b-1300",
        "a-1100",
    ]
    assert doc["recent"][1]["router"] == fakes[1].url
    assert [r["admin"] for r in doc["routers"]] == [f.url for f in fakes]


def test_report_as_a_process_with_the_admin_port_from_the_config(
    fakes: list[FakeRouter], tmp_path: Path
) -> None:
    """No --admin: the router on this machine, port from server.admin_listen."""
    fakes[0].tenants["acme"] = stats(10, 10)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"server": {"admin_listen": f"0.0.0.0:{fakes[0].port}"}}))
    done = run_router(
        "shadow", "report", "acme", "--config", str(config), "--json",
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["routers"][0]["admin"] == fakes[0].url
    assert json.loads(done.stdout)["compared"] == 10
    assert fakes[0].paths() == ["/admin/shadow"] and fakes[1].calls == []


def test_a_tenant_never_shadowed(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes[1].enabled = False
    code, out, _ = run(capsys, "shadow", "report", "acme", *admin_args(fakes))
    assert code == 0
    assert "no shadow traffic recorded for acme yet" in out
    assert f"shadow traffic is NOT enabled on: {fakes[1].url}" in out


def test_an_unreachable_router_exits_1_and_says_which(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    two_routers_of_data(fakes)
    dead = refused_url()
    code, out, err = run(
        capsys, "shadow", "report", "acme", "--admin", fakes[0].url, "--admin", dead
    )
    assert code == 1
    assert f"{dead}: unreachable (ConnectError" in err
    assert "PARTIAL" in out
    assert "1 of 2 router(s) answered" in out
    assert "99.50 % (597 of 600 compared)" in out  # the one that answered


def test_a_worker_missing_makes_the_report_partial(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    two_routers_of_data(fakes)
    fakes[1].status = 503
    code, out, err = run(capsys, "shadow", "report", "acme", *admin_args(fakes), "--json")
    assert code == 1
    assert "1 worker process(es) did not answer (HTTP 503)" in err
    doc = json.loads(out)
    assert doc["complete"] is False and doc["compared"] == 1000


def test_a_wrong_token_exits_1(
    fakes: list[FakeRouter],
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", "not-the-token")
    code, _, err = run(capsys, "shadow", "report", "acme", "--admin", fakes[0].url)
    assert code == 1
    assert "unauthorized: ROUTER_ADMIN_TOKEN is not this router's admin token" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "ac me"], "'ac me' is not a valid tenant id"),
        (["report", "x" * 129], "is not a valid tenant id (1 to 128 characters"),
        (["reset", "acme/../x"], "is not a valid tenant id"),
        (["report", "acme", "--admin", "ftp://h:1"], "--admin must be a router's admin URL"),
        (["report", "acme", "--admin", "http://h:1/admin"], "without a path"),
        (["report", "acme", "--config", "/nonexistent.yaml"], "cannot read the config"),
    ],
)
def test_usage_errors_exit_2_and_call_nobody(
    fakes: list[FakeRouter],
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    code, _, err = run(capsys, "shadow", *argv, "--admin", fakes[0].url)
    assert code == 2
    assert message in err
    assert fakes[0].calls == []


def test_no_token_exits_2(
    fakes: list[FakeRouter],
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ROUTER_ADMIN_TOKEN")
    code, _, err = run(capsys, "shadow", "report", "acme", "--admin", fakes[0].url)
    assert code == 2
    assert "ROUTER_ADMIN_TOKEN is not set" in err
    assert fakes[0].calls == []


# ---- router shadow reset ----------------------------------------------------------------


def test_reset_deletes_on_every_router(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    two_routers_of_data(fakes)
    code, out, err = run(capsys, "shadow", "reset", "acme", *admin_args(fakes))
    assert code == 0, err
    assert "reset acme on 2 of 2 router(s)" in out
    for fake in fakes:
        assert fake.calls == [("DELETE", "/admin/shadow/acme", {})]
        assert "acme" not in fake.tenants
    assert "globex" in fakes[0].tenants


def test_reset_fails_when_one_router_does_not(
    fakes: list[FakeRouter], cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes[1].status = 503
    dead = refused_url()
    code, out, err = run(capsys, "shadow", "reset", "acme", *admin_args(fakes), "--admin", dead)
    assert code == 1
    assert "reset acme on 1 of 3 router(s)" in out
    assert f"{fakes[1].url}: 1 worker process(es) did not answer" in err
    assert f"{dead}: unreachable" in err
    assert fakes[0].paths("DELETE") == ["/admin/shadow/acme"]


# ---- the cutover's shadow gate ----------------------------------------------------------


def flag(path: Path, tenant: str) -> str:
    return tenant_variation(read_flag_file(path), tenant)


async def gated(
    tenant: str, flags: Path, fakes: list[FakeRouter], match: float, **options: Any
) -> Any:
    return await cutover(
        tenant,
        FileFlagWriter(flags),
        [f.url for f in fakes],
        TOKEN,
        poll=0.01,
        settle_time=0.02,
        verify_timeout=2.0,
        shadow_match=match,
        **options,
    )


async def test_gate_refuses_too_few_samples_and_changes_nothing(
    fakes: list[FakeRouter], flags: Path
) -> None:
    fakes[0].tenants["acme"] = stats(20, 20)
    fakes[1].tenants["acme"] = stats(17, 17)
    before = await asyncio.to_thread(flags.read_bytes)
    result = await gated("acme", flags, fakes, 0.999)
    assert result.outcome == "refused" and result.exit_code == 1
    assert result.reason == "only 37 shadow comparisons for acme (need 100)"
    assert "router shadow report acme" in result.advice
    assert [(s.name, s.ok) for s in result.steps] == [("preflight", False)]
    assert result.flag_writes == []
    assert await asyncio.to_thread(flags.read_bytes) == before and flag(flags, "acme") == "legacy"
    for fake in fakes:
        assert ("GET", "/admin/shadow", {"tenant": "acme", "limit": "5"}) in fake.calls


async def test_gate_refuses_a_low_match_rate(fakes: list[FakeRouter], flags: Path) -> None:
    fakes[0].tenants["acme"] = stats(500, 490, {"status": 3, "body": 7})
    fakes[1].tenants["acme"] = stats(500, 491, {"body": 9})
    result = await gated("acme", flags, fakes, 0.999, shadow_min_samples=1000)
    assert result.outcome == "refused"
    assert result.reason.startswith("shadow match rate 98.10 % is below the required 99.90 %")
    assert result.reason.endswith("mismatches: status 3, body 16")
    assert "router shadow reset acme" in result.advice
    assert result.flag_writes == [] and flag(flags, "acme") == "legacy"


async def test_gate_tells_close_rates_apart(fakes: list[FakeRouter], flags: Path) -> None:
    fakes[0].tenants["acme"] = stats(100_000, 99_994, {"body": 6})
    result = await gated("acme", flags, fakes, 0.99995)
    assert result.outcome == "refused"
    assert "99.994 % is below the required 99.995 %" in result.reason


async def test_gate_refuses_when_a_router_has_no_full_report(
    fakes: list[FakeRouter], flags: Path
) -> None:
    for fake in fakes:
        fake.tenants["acme"] = stats(5000, 5000)
    fakes[1].status = 503
    result = await gated("acme", flags, fakes, 0.99)
    assert result.outcome == "refused"
    assert f"{fakes[1].url}: 1 worker process(es) did not answer" in result.reason
    assert result.flag_writes == [] and flag(flags, "acme") == "legacy"


@pytest.mark.parametrize(
    ("matched", "required", "shown"),
    [(1999, 0.999, "shadow 99.95 % of 2000"), (1998, 0.999, "shadow 99.90 % of 2000")],
)
async def test_gate_passes_and_the_cutover_completes(
    fakes: list[FakeRouter], flags: Path, matched: int, required: float, shown: str
) -> None:
    fakes[0].tenants["acme"] = stats(1000, 1000)
    fakes[1].tenants["acme"] = stats(1000, matched - 1000, {"body": 2000 - matched})
    result = await gated("acme", flags, fakes, required, shadow_min_samples=2000)
    assert result.outcome == "moved", result.reason
    assert shown in result.steps[0].detail
    assert result.flag_writes == ["hold", "new"]
    assert flag(flags, "acme") == "new"


async def test_a_tenant_already_on_new_is_not_gated(fakes: list[FakeRouter], flags: Path) -> None:
    result = await gated("globex", flags, fakes, 1.0)
    assert result.outcome == "already-new" and result.ok
    assert all("/admin/shadow" not in f.paths() for f in fakes)


async def test_the_gate_is_checked_only_when_asked(fakes: list[FakeRouter], flags: Path) -> None:
    result = await cutover(
        "acme", FileFlagWriter(flags), [f.url for f in fakes], TOKEN, poll=0.01, settle_time=0.02
    )
    assert result.outcome == "moved"
    assert all("/admin/shadow" not in f.paths() for f in fakes)


# ---- the gate from the command line -----------------------------------------------------


def test_cutover_cli_refuses_below_the_default_min_samples(
    fakes: list[FakeRouter], flags: Path, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes[0].tenants["acme"] = stats(99, 99)
    code, out, _ = run(
        capsys, "cutover", "acme", "--flags-file", str(flags), *admin_args(fakes),
        "--require-shadow-match", "0.99", "--poll", "0.01",
    )  # fmt: skip
    assert code == 1
    assert "acme not cut over (nothing changed): only 99 shadow comparisons" in out
    assert "(need 100)" in out
    assert "next: Nothing was changed." in out
    assert flag(flags, "acme") == "legacy"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-samples", "10"], "--min-samples only applies with --require-shadow-match"),
        (["--require-shadow-match", "99.9"], "must be a fraction in (0, 1]"),
        (["--require-shadow-match", "0"], "must be a fraction in (0, 1]"),
        (["--require-shadow-match", "0.9", "--min-samples", "0"], "must be >= 1"),
    ],
)
def test_cutover_gate_usage_errors_exit_2(
    fakes: list[FakeRouter],
    flags: Path,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    try:
        code, _, err = run(
            capsys, "cutover", "acme", "--flags-file", str(flags), *admin_args(fakes), *argv
        )
    except SystemExit as exc:  # argparse's own type errors
        code, err = int(str(exc.code)), capsys.readouterr().err
    assert code == 2
    assert message in err
    assert all(f.calls == [] for f in fakes)
    assert flag(flags, "acme") == "legacy"


def test_migrate_gates_each_tenant(
    fakes: list[FakeRouter],
    flags: Path,
    tmp_path: Path,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for fake in fakes:
        fake.tenants["acme"] = stats(100, 100)
        fake.tenants["initech"] = stats(100, 90, {"status": 10})
    tenants = tmp_path / "tenants.txt"
    tenants.write_text("acme\ninitech\n")
    code, out, err = run(
        capsys, "migrate", "--tenants", str(tenants), "--flags-file", str(flags),
        *admin_args(fakes), "--require-shadow-match", "0.95", "--min-samples", "200",
        "--poll", "0.01",
    )  # fmt: skip
    assert code == 1, err
    assert flag(flags, "acme") == "new"
    assert flag(flags, "initech") == "legacy"
    assert "initech: refused (nothing changed)" in out
    assert "shadow match rate 90.00 % is below the required 95.00 %" in out
