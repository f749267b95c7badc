"""Flag writers (router/control/flagwriters.py): the flag file, and LaunchDarkly's REST API v2
against a local server that checks every request the way LaunchDarkly documents it and
keeps the flag's state, so a read after a write shows the write."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from router.control.flagwriters import (
    SEMANTIC_PATCH,
    FileFlagWriter,
    FlagWriter,
    FlagWriterError,
    LaunchDarklyFlagWriter,
)

TOKEN = "api-0123456789abcdef"  # a LaunchDarkly access token, sent raw (no "Bearer")
PROJECT = "saas"
ENV = "production"
FLAG = "tenant-routing"


# ---- a local LaunchDarkly REST API ------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeLaunchDarkly:
    """GET /api/v2/flags/{project}/{flag}?env=E and semantic-patch PATCH on the same path."""

    ids: dict[str, str] = field(
        default_factory=lambda: {v: str(uuid.uuid4()) for v in ("legacy", "hold", "new")}
    )
    requests: list[Seen] = field(default_factory=list)
    # (method, status, headers): the next request with that method (None: any) gets this
    # answer instead of being handled; first in, first out.
    inject: list[tuple[str | None, int, dict[str, str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # request shapes LD would reject
    flag: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = ["legacy", "hold", "new"]

        def config(name: str) -> dict[str, Any]:
            return {
                "on": True,
                "archived": False,
                "salt": "abc",
                "sel": "def",
                "lastModified": 1,
                "version": 1,
                "targets": [{"values": ["a-user"], "variation": 0, "contextKind": "user"}],
                "contextTargets": [{"contextKind": "tenant", "variation": 2, "values": ["globex"]}],
                "rules": [],
                "fallthrough": {"variation": 0},
                "offVariation": 0,
                "prerequisites": [],
                "_site": {"href": f"/{PROJECT}/{name}/features/{FLAG}", "type": "text/html"},
                "_environmentName": name,
                "trackEvents": False,
                "trackEventsFallthrough": False,
            }

        self.flag = {
            "name": "Tenant routing",
            "kind": "multivariate",
            "key": FLAG,
            "_version": 1,
            "variations": [{"_id": self.ids[v], "value": v, "name": v} for v in values],
            "environments": {ENV: config(ENV), "staging": config("staging")},
            "_links": {"self": {"href": f"/api/v2/flags/{PROJECT}/{FLAG}"}},
        }

    def context_targets(self, env: str = ENV) -> dict[str, list[str]]:
        """{variation value: sorted tenant ids} for context kind tenant."""
        out: dict[str, list[str]] = {}
        values = [v["value"] for v in self.flag["variations"]]
        for entry in self.flag["environments"][env]["contextTargets"]:
            if entry["contextKind"] == "tenant" and entry["values"]:
                out[values[entry["variation"]]] = sorted(entry["values"])
        return out

    def patches(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "PATCH"]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/v2/flags/{project}/{flag}", self.handle)
        return app

    @staticmethod
    def error(status: int, code: str, message: str) -> web.Response:
        body = {"code": code, "message": message, "id": str(uuid.uuid4())}
        return web.json_response(body, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append(
            Seen(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        if self.inject and self.inject[0][0] in (None, request.method):
            _, status, headers = self.inject.pop(0)
            return web.json_response(
                {"code": "injected", "message": f"injected {status}"},
                status=status,
                headers=headers,
            )
        if request.headers.get("Authorization") != TOKEN:
            return self.error(401, "unauthorized", "Invalid access token")
        if request.headers.get("LD-API-Version") != "20240415":
            self.problems.append(f"LD-API-Version {request.headers.get('LD-API-Version')!r}")
        if (request.match_info["project"], request.match_info["flag"]) != (PROJECT, FLAG):
            return self.error(404, "not_found", "Unknown resource")
        if request.method == "GET":
            return self.get(request)
        if request.method == "PATCH":
            return self.patch(request, body)
        return self.error(405, "method_not_allowed", request.method)

    def get(self, request: web.Request) -> web.Response:
        env = request.query.get("env")
        flag = dict(self.flag)
        if env is not None:
            # "setting env=production restricts the returned configurations to just the
            # production environment"
            flag["environments"] = {
                k: v for k, v in self.flag["environments"].items() if k in env.split(",")
            }
        return web.json_response(flag)

    def patch(self, request: web.Request, body: Any) -> web.Response:
        if request.headers.get("Content-Type") != SEMANTIC_PATCH:
            self.problems.append(f"Content-Type {request.headers.get('Content-Type')!r}")
            return self.error(400, "invalid_request", "expected a semantic patch")
        if not isinstance(body, dict) or set(body) != {"environmentKey", "comment", "instructions"}:
            self.problems.append(f"body keys {sorted(body) if isinstance(body, dict) else body}")
            return self.error(400, "invalid_request", "bad semantic patch body")
        env = body["environmentKey"]
        if env not in self.flag["environments"]:
            return self.error(400, "invalid_request", f"unknown environment {env}")
        config = json.loads(json.dumps(self.flag["environments"][env]))  # applied atomically
        index = {v["_id"]: i for i, v in enumerate(self.flag["variations"])}
        for instruction in body["instructions"]:
            keys = {"kind", "contextKind", "variationId", "values"}
            if set(instruction) != keys or instruction["kind"] not in (
                "addTargets",
                "removeTargets",
            ):
                self.problems.append(f"instruction {instruction}")
                return self.error(400, "invalid_request", "unsupported instruction")
            if instruction["variationId"] not in index:
                return self.error(400, "invalid_request", "unknown variationId")
            kind = instruction["contextKind"]
            variation = index[instruction["variationId"]]
            entries = [e for e in config["contextTargets"] if e["contextKind"] == kind]
            entry = next((e for e in entries if e["variation"] == variation), None)
            if entry is None:
                entry = {"contextKind": kind, "variation": variation, "values": []}
                config["contextTargets"].append(entry)
            for key in instruction["values"]:
                if instruction["kind"] == "removeTargets":
                    if key in entry["values"]:
                        entry["values"].remove(key)
                    continue
                # "Returns an error if this causes the flag to target the same context key
                # in multiple variations."
                if any(key in e["values"] for e in entries if e is not entry):
                    return self.error(
                        400, "invalid_request", f"{key} is already targeted by another variation"
                    )
                if key not in entry["values"]:
                    entry["values"].append(key)
        config["version"] += 1
        self.flag["environments"][env] = config
        return web.json_response(self.flag)


MakeLD = Callable[..., Awaitable[tuple[FakeLaunchDarkly, LaunchDarklyFlagWriter]]]


@pytest.fixture
async def make_ld(aiohttp_server: Any) -> Any:
    writers: list[LaunchDarklyFlagWriter] = []

    async def make(
        token: str = TOKEN, **kwargs: Any
    ) -> tuple[FakeLaunchDarkly, LaunchDarklyFlagWriter]:
        fake = FakeLaunchDarkly()
        server: TestServer = await aiohttp_server(fake.app())
        writer = LaunchDarklyFlagWriter(
            token,
            PROJECT,
            ENV,
            FLAG,
            base_url=f"http://127.0.0.1:{server.port}",
            **{"backoff": 0.01, **kwargs},
        )
        writers.append(writer)
        return fake, writer

    yield make
    for writer in writers:
        await writer.aclose()


# ---- LaunchDarkly -----------------------------------------------------------------------


async def test_launchdarkly_writer_is_a_flag_writer(make_ld: MakeLD) -> None:
    _, writer = await make_ld()
    assert isinstance(writer, FlagWriter)
    assert isinstance(FileFlagWriter("x.json"), FlagWriter)
    assert TOKEN not in writer.describe()
    assert PROJECT in writer.describe() and ENV in writer.describe()


async def test_get_reads_the_environments_context_targets(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    assert await writer.get("globex") == "new"  # individually targeted
    assert await writer.get("acme") == "legacy"  # the fallthrough
    assert await writer.get("a-user") == "legacy"  # a *user* target is not a tenant's
    for seen in fake.requests:
        assert seen.method == "GET"
        assert seen.path == f"/api/v2/flags/{PROJECT}/{FLAG}"
        assert seen.query == {"env": ENV}
        assert seen.headers["Authorization"] == TOKEN  # the raw token, no "Bearer"
        assert seen.headers["LD-API-Version"] == "20240415"
    assert fake.problems == []


def instruction(kind: str, variation_id: str, tenant: str) -> dict[str, Any]:
    return {"kind": kind, "contextKind": "tenant", "variationId": variation_id, "values": [tenant]}


async def test_set_sends_a_documented_semantic_patch_and_get_sees_it(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    ids = fake.ids

    await writer.set("acme", "hold")  # acme is not individually targeted yet: add only
    (first,) = fake.patches()
    assert first.path == f"/api/v2/flags/{PROJECT}/{FLAG}"
    assert (
        first.headers["Content-Type"] == "application/json; domain-model=launchdarkly.semanticpatch"
    )
    assert first.headers["Authorization"] == TOKEN
    assert first.body == {
        "environmentKey": ENV,
        "comment": "router cutover: tenant acme: legacy -> hold",
        "instructions": [instruction("addTargets", ids["hold"], "acme")],
    }
    assert await writer.get("acme") == "hold"

    await writer.set("acme", "new")  # moved in ONE patch: remove from hold, add to new
    second = fake.patches()[1]
    assert second.body["instructions"] == [
        instruction("removeTargets", ids["hold"], "acme"),
        instruction("addTargets", ids["new"], "acme"),
    ]
    assert second.body["comment"] == "router cutover: tenant acme: hold -> new"
    assert await writer.get("acme") == "new"
    assert fake.context_targets() == {"new": ["acme", "globex"]}
    assert fake.context_targets("staging") == {"new": ["globex"]}  # other environment untouched
    assert fake.flag["environments"][ENV]["targets"][0]["values"] == ["a-user"]
    assert fake.problems == []


async def test_set_to_the_current_target_writes_nothing(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    await writer.set("globex", "new")
    assert fake.patches() == []


async def test_rate_limited_patch_waits_for_retry_after(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    fake.inject = [("PATCH", 429, {"Retry-After": "1"})]
    started = time.monotonic()
    await writer.set("acme", "hold")
    elapsed = time.monotonic() - started
    assert elapsed >= 0.95, f"retried after {elapsed:.2f} s, before Retry-After said"
    assert [r.method for r in fake.requests] == ["GET", "PATCH", "PATCH"]
    assert fake.requests[1].body == fake.requests[2].body
    assert await writer.get("acme") == "hold"


async def test_rate_limit_reset_header_is_honoured(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    reset_ms = int((time.time() + 0.5) * 1000)
    fake.inject = [("GET", 429, {"X-Ratelimit-Reset": str(reset_ms)})]
    started = time.monotonic()
    assert await writer.get("globex") == "new"
    assert time.monotonic() - started >= 0.3
    assert len(fake.requests) == 2


async def test_server_errors_are_retried_a_bounded_number_of_times(make_ld: MakeLD) -> None:
    fake, writer = await make_ld(max_attempts=4)
    fake.inject = [("PATCH", 503, {}), ("PATCH", 502, {})]
    await writer.set("acme", "new")  # two 5xx, then through
    assert await writer.get("acme") == "new"

    fake.requests.clear()
    fake.inject = [(None, 500, {})] * 10
    with pytest.raises(FlagWriterError, match=r"after 4 attempts; last: 500"):
        await writer.get("acme")
    assert len(fake.requests) == 4  # bounded: max_attempts, no more


async def test_conflict_is_retried(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    fake.inject = [("PATCH", 409, {})]
    await writer.set("acme", "hold")
    assert [r.method for r in fake.requests] == ["GET", "PATCH", "PATCH"]


async def test_auth_failure_is_a_clear_error_without_retries(make_ld: MakeLD) -> None:
    fake, writer = await make_ld(token="api-wrong")
    with pytest.raises(FlagWriterError) as caught:
        await writer.set("acme", "hold")
    message = str(caught.value)
    assert "401" in message and "LAUNCHDARKLY_API_TOKEN" in message
    assert "api-wrong" not in message  # never echo a secret
    assert len(fake.requests) == 1
    assert fake.patches() == []


async def test_missing_flag_and_rejected_patch_are_errors(aiohttp_server: Any) -> None:
    fake = FakeLaunchDarkly()
    server = await aiohttp_server(fake.app())
    base = f"http://127.0.0.1:{server.port}"
    missing = LaunchDarklyFlagWriter(TOKEN, PROJECT, ENV, "no-such-flag", base_url=base)
    other_env = LaunchDarklyFlagWriter(TOKEN, PROJECT, "qa", FLAG, base_url=base)
    try:
        with pytest.raises(FlagWriterError, match=r"no flag 'no-such-flag' in project 'saas'"):
            await missing.get("acme")
        with pytest.raises(FlagWriterError, match=r"no configuration for environment 'qa'"):
            await other_env.get("acme")
    finally:
        await missing.aclose()
        await other_env.aclose()


async def test_writer_refuses_bad_input_before_any_request(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    with pytest.raises(FlagWriterError, match="variation must be one of"):
        await writer.set("acme", "sideways")
    with pytest.raises(FlagWriterError, match="invalid tenant id"):
        await writer.get("a b")
    assert fake.requests == []
    with pytest.raises(FlagWriterError, match="LAUNCHDARKLY_API_TOKEN"):
        LaunchDarklyFlagWriter("", PROJECT, ENV)


async def test_flag_turned_off_is_not_targeted(make_ld: MakeLD) -> None:
    fake, writer = await make_ld()
    fake.flag["environments"][ENV]["on"] = False
    assert await writer.get("globex") == "legacy"  # off: offVariation for everyone
    with pytest.raises(FlagWriterError, match="is off"):
        await writer.set("acme", "hold")
    assert fake.patches() == []


# ---- the flag file ----------------------------------------------------------------------


async def test_file_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_tenants(path, ["globex"], "new", create=True)
    writer = FileFlagWriter(path)
    assert await writer.get("globex") == "new"
    assert await writer.get("acme") == "legacy"
    version = read_flag_file(path)["flags"]["tenant-routing"]["version"]
    await writer.set("acme", "hold")
    assert await writer.get("acme") == "hold"
    assert tenant_variation(read_flag_file(path), "acme") == "hold"
    await writer.set("acme", "hold")  # no-op: no write, no version bump
    assert read_flag_file(path)["flags"]["tenant-routing"]["version"] == version + 1
    assert str(path) in writer.describe()


async def test_file_writer_errors_are_flag_writer_errors(tmp_path: Path) -> None:
    writer = FileFlagWriter(tmp_path / "missing.json")
    with pytest.raises(FlagWriterError, match="does not exist"):
        await writer.get("acme")
    with pytest.raises(FlagWriterError, match="does not exist"):
        await writer.set("acme", "hold")
    other_key = FileFlagWriter(tmp_path / "flags.json", flag_key="other-flag")
    set_tenants(tmp_path / "flags.json", ["acme"], "new", create=True)
    assert await other_key.get("acme") == "legacy"  # that flag does not exist: default
