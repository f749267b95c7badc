"""The load test's verdict (loadtests/verdict.py) on a real fleet: two router processes
and the recording backends, one router's flag file late."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.support.paths import REPO

LOADTESTS = REPO / "loadtests"
sys.path.insert(0, str(LOADTESTS))

import verdict  # noqa: E402


def test_a_second_router_with_a_lagging_flag_file_fails_the_verdict(tmp_path: Path) -> None:
    """Two routers in front of the recording backends; the tenant is cut over through the
    first one only (its admin is the only one given), and the second's flag file gets the
    change 1.5 s late: the second router keeps sending the tenant to legacy after the
    cutover finished, and the verdict names the tenant."""
    import json
    import shutil
    import threading
    import time

    from router.control.flagfile import set_tenants
    from tests.support.procs import Procs, request, run_router, write_config

    tenant = "tenant-lag"
    token = {"ROUTER_ADMIN_TOKEN": "lag-test-token"}
    with Procs() as procs:
        ports = {}
        for side in ("legacy", "new"):
            proc = procs.start(
                [
                    *(sys.executable, str(LOADTESTS / "recording_backend.py"), "--side", side),
                    *("--port", "0", "--record", str(tmp_path / f"{side}.jsonl")),
                ],
                name=f"rec-{side}",
            )
            ports[side] = json.loads(proc.wait_line(lambda s: '"listening"' in s))["port"]
        urls = {side: f"http://127.0.0.1:{port}" for side, port in ports.items()}
        routers = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            flags = tmp_path / name / "flags.json"
            set_tenants(flags, [tenant, "other"], "legacy", create=True)
            config = write_config(
                tmp_path / name / "router.yaml", urls["legacy"], urls["new"], flags
            )
            routers.append((procs.router(config, env=token), flags, config))
        (router_a, flags_a, config_a), (router_b, flags_b, _) = routers

        client: list[dict[str, Any]] = []
        stop = threading.Event()

        def send() -> None:
            i = 0
            while not stop.is_set() and i < 400:
                router = (router_a, router_b)[i % 2]
                seq = f"lag-{i}"
                t = time.time()
                response = request(
                    router.port, "/api/x", headers={"X-Tenant-Id": tenant, "X-Load-Seq": seq}
                )
                side = response.headers.get("X-Backend-Side", "")
                client.append(
                    {"t": t, "seq": seq, "tenant": tenant, "side": side, "kind": "get",
                     "status": response.status, "ms": 1.0, "ok": response.status == 200,
                     "fault": False, "error": ""}
                )  # fmt: skip
                i += 1
                time.sleep(0.01)

        sender = threading.Thread(target=send, daemon=True)
        start = time.time()
        sender.start()
        time.sleep(0.5)
        done = run_router(
            "cutover", tenant, "--json", "--flags-file", str(flags_a), "--config",
            str(config_a), "--admin", f"http://127.0.0.1:{router_a.admin_port}", env=token,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        time.sleep(1.5)
        shutil.copyfile(flags_a, flags_b)  # the lagging router's flag file catches up
        time.sleep(0.5)
        stop.set()
        sender.join(timeout=20)
        duration = time.time() - start
    cut = verdict.cutover_from_json(json.loads(done.stdout))
    backend = verdict.read_jsonl(tmp_path / "legacy.jsonl") + verdict.read_jsonl(
        tmp_path / "new.jsonl"
    )
    result = verdict.judge(
        [{"event": "start", "t": start}, *client],
        backend,
        [cut],
        expected_requests=len(client),
        duration=duration,
    )
    assert not result["ok"]
    wrong = [f for f in result["failures"] if f.startswith("wrong side")]
    assert wrong and tenant in wrong[0] and "legacy" in wrong[0] and "after" in wrong[0], result
