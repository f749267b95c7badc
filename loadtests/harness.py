"""The production-scale load test: a compressed day of traffic with cutovers under load.

    .venv/bin/python loadtests/harness.py [--duration 600] [--scale 1] [--out DIR] ...
    make loadtest                        # 600 s, scale 1
    make loadtest-smoke                  # 60 s, 2 % of tenants moved

Locally (the default) it starts, on free ports of 127.0.0.1: two recording backends
(recording_backend.py, legacy and new), `router serve` (1 worker, flags from a file in the
output folder, drain_delay 0), then locust headless with the day's shape
(locustfile.py + shape.py). While the day runs it moves a share of the tenants (the
busiest included) with `router cutover` one at a time and with `router migrate` waves.
When the shape ends it stops everything it started (by pid: SIGTERM, then SIGKILL), reads
the recordings, and writes to the output folder (default loadtests/results/<UTC time>/):

    verdict.json          the verdict (ok, failures naming the tenant or figure, figures)
    chart.png             requests/s per side, p99 per side, failures, cutovers marked
    locust_stats.csv ...  locust's --csv files, and locust.html
    client.jsonl          one line per request as the load generator saw it
    legacy.jsonl new.jsonl  what each backend recorded
    cutovers.jsonl        `router cutover --json` outputs; wave-N.journal: migrate journals
    router.log router-access.log backend-*.log locust.log

Exit status 0 when the verdict passes, 1 when it fails, 2 on a setup error.

Against a deployed router: `--host URL --admin URL [--admin URL ...] --flags-file F`
(or `--no-cutovers`), `ROUTER_ADMIN_TOKEN` in the environment, and `--records FILE ...`
with the backends' recordings if they run recording_backend.py; without records the
verdict uses each response's `X-Backend-Side` (needs `debug_headers`) at its send time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))

import shape  # noqa: E402
import verdict  # noqa: E402

PY = sys.executable
ADMIN_TOKEN = "loadtest-admin-token"


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.out = Path(args.out or HERE / "results" / stamp).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.files: list[IO[bytes]] = []
        self.cutovers: list[verdict.Cutover] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["ROUTER_ADMIN_TOKEN"] = os.environ.get("ROUTER_ADMIN_TOKEN", ADMIN_TOKEN)
        self.log = (self.out / "harness.log").open("a", encoding="utf-8")

    def say(self, message: str) -> None:
        line = f"{datetime.now(UTC).strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    # ---- processes ---------------------------------------------------------------------

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out = (self.out / f"{name}.log").open("ab")
        self.files.append(out)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or self.env,
            cwd=self.out,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        """SIGTERM each process we started (newest first), SIGKILL after 10 s: by pid."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.say(f"{name} (pid {proc.pid}) ignored SIGTERM: SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.procs.clear()
        for f in self.files:
            f.close()
        self.files.clear()

    def wait_json_line(self, name: str, key: str, timeout: float = 20) -> dict[str, Any]:
        path = self.out / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in path.read_text(errors="replace").splitlines():
                if key in line:
                    with contextlib.suppress(json.JSONDecodeError):
                        return dict(json.loads(line))
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not print {key} within {timeout} s: see {path}")

    # ---- local stack ---------------------------------------------------------------------

    def start_stack(self, initial_new: list[str], moved: list[str]) -> None:
        import yaml

        from router.control.flagfile import set_tenants

        flags = self.out / "flags.json"
        set_tenants(flags, initial_new, "new", create=True)
        set_tenants(flags, moved, "legacy")
        self.flags = flags
        ports: dict[str, int] = {}
        for side in ("legacy", "new"):
            argv = [PY, str(HERE / "recording_backend.py"), "--side", side, "--port", "0"]
            argv += ["--record", str(self.out / f"{side}.jsonl")]
            latency = self.args.inject_latency_ms if side in self.args.inject_sides else 0.0
            errors = self.args.inject_error_rate if side in self.args.inject_sides else 0.0
            argv += ["--latency-ms", str(latency), "--error-rate", str(errors)]
            self.start(f"backend-{side}", argv)
        for side in ("legacy", "new"):
            ports[side] = int(self.wait_json_line(f"backend-{side}", '"listening"')["port"])
        config = {
            "server": {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "workers": 1,
                "drain_delay": 0,
                "shutdown_timeout": 5,
                "debug_headers": True,
            },
            "flags": {"source": "file", "file": str(flags), "poll_interval": 0.1},
            "upstreams": {
                "legacy": {"url": f"http://127.0.0.1:{ports['legacy']}"},
                "new": {"url": f"http://127.0.0.1:{ports['new']}"},
            },
            "ledger": f"sqlite:///{self.out / 'ledger.db'}",
        }
        if self.args.shadow_rate > 0 and moved:
            # Shadow the tenants about to move, as an SRE would before their cutovers, with
            # the noise filter on (its legacy replays are exercised too). The verdict keeps
            # the copies apart from the clients' requests and fails any unsafe copy.
            config["shadow"] = {
                "tenants": moved,
                "sample_rate": self.args.shadow_rate,
                "noise_filter": True,
            }
        self.config = self.out / "router.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        # The access log (stdout) goes to its own file; the router's own logs (stderr) to
        # router.log, where its "router listening" line gives the ports.
        access = (self.out / "router-access.log").open("ab")
        errlog = (self.out / "router.log").open("ab")
        self.files += [access, errlog]
        proc = subprocess.Popen(
            [PY, "-m", "router", "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=access,
            stderr=errlog,
            env=self.env,
            cwd=self.out,
            start_new_session=True,
        )
        self.procs.append(("router", proc))
        started = self.wait_json_line("router", '"router listening"')
        self.host = f"http://127.0.0.1:{started['port']}"
        self.admins = [f"http://127.0.0.1:{started['admin_port']}"]
        self.wait_ready(self.admins[0])

    def wait_ready(self, admin: str, timeout: float = 20) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{admin}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"router at {admin} not ready within {timeout} s")

    # ---- cutovers ------------------------------------------------------------------------

    def cutover_args(self) -> list[str]:
        argv = ["--flags-file", str(self.flags)]
        if getattr(self, "config", None):
            argv += ["--config", str(self.config)]
        for admin in self.admins:
            argv += ["--admin", admin]
        return argv

    def sleep_until(self, at: float) -> bool:
        """Sleep until monotonic time `at`; False if the run is stopping."""
        return not self.stop_event.wait(max(0.0, at - time.monotonic()))

    def run_singles(self, tenants: list[str], begin: float) -> None:
        d = self.args.duration
        for i, tenant in enumerate(tenants):
            at = begin + d * (0.08 + 0.8 * (i + 0.5) / len(tenants))
            if not self.sleep_until(at):
                return
            argv = [PY, "-m", "router", "cutover", tenant, "--json", *self.cutover_args()]
            try:
                done = subprocess.run(
                    argv, env=self.env, cwd=self.out, capture_output=True, timeout=120, check=False
                )
                doc = json.loads(done.stdout)
            except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                self.say(f"cutover {tenant}: {exc!r}")
                doc = {"tenant": tenant, "steps": [], "result": {"ok": False, "outcome": "error"}}
            with (self.out / "cutovers.jsonl").open("a") as f:
                f.write(json.dumps(doc) + "\n")
            cut = verdict.cutover_from_json(doc)
            with self.lock:
                self.cutovers.append(cut)
            self.say(f"cutover {tenant}: {cut.outcome} ({doc.get('total_ms')} ms)")

    def run_wave(self, number: int, tenants: list[str], at: float) -> None:
        if not self.sleep_until(at):
            return
        name = f"wave-{number}"
        listing = self.out / f"{name}.txt"
        listing.write_text("\n".join(tenants) + "\n")
        journal = self.out / f"{name}.journal"
        argv = [PY, "-m", "router", "migrate", "--tenants", str(listing)]
        argv += ["--journal", str(journal), "--concurrency", str(self.args.concurrency)]
        argv += ["--progress-interval", "5", *self.cutover_args()]
        self.say(f"{name}: router migrate of {len(tenants)} tenants")
        started = time.monotonic()
        try:
            with (self.out / f"{name}.log").open("ab") as log:
                code = subprocess.run(
                    argv,
                    env=self.env,
                    cwd=self.out,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(120.0, self.args.duration),
                    check=False,
                ).returncode
        except subprocess.TimeoutExpired:
            code = -1
        cuts = verdict.cutovers_from_journal(verdict.read_jsonl(journal), name)
        for tenant in set(tenants) - {c.tenant for c in cuts}:
            cuts.append(verdict.Cutover(tenant, name, False, "not started", None, None))
        with self.lock:
            self.cutovers.extend(cuts)
        moved = sum(c.ok for c in cuts)
        self.say(
            f"{name}: exit {code}, {moved}/{len(tenants)} moved "
            f"in {time.monotonic() - started:.1f} s"
        )

    # ---- the run -------------------------------------------------------------------------

    def plan(self) -> tuple[list[str], list[str], list[str], list[list[str]]]:
        """(initially new, singles, all moved, waves)."""
        rng = random.Random(self.args.seed)
        width = max(4, len(str(self.args.tenants - 1)))
        tenants = [f"tenant-{i:0{width}d}" for i in range(self.args.tenants)]
        count = round(self.args.tenants * self.args.move_share)
        busy = tenants[: min(self.args.busy, count)]  # ranks 0..: the busiest (Zipf)
        rest = tenants[len(busy) :]
        pool = rng.sample(rest, len(rest))
        moved = busy + pool[: count - len(busy)]
        leftover = pool[count - len(busy) :]
        initial_new = leftover[: round(self.args.tenants * self.args.initial_new_share)]
        singles_n = min(self.args.singles, len(moved))
        # The busiest go one at a time, the rest of the singles are random.
        singles = moved[:singles_n]
        others = moved[singles_n:]
        waves_n = max(1, self.args.waves) if others else 0
        waves = [others[i::waves_n] for i in range(waves_n)]
        return initial_new, singles, moved, [w for w in waves if w]

    def run(self) -> int:
        a = self.args
        initial_new, singles, moved, waves = self.plan()
        if a.no_cutovers:
            singles, moved, waves = [], [], []
        self.say(
            f"output {self.out}; {a.tenants} tenants, {len(moved)} to move "
            f"({len(singles)} one at a time, {len(waves)} migrate waves), "
            f"{len(initial_new)} already on new; day of {a.duration:.0f} s at scale {a.scale} "
            f"(mean {shape.mean_rate(a.scale):.1f}/s, peak {shape.peak_rate(a.scale):.1f}/s)"
        )
        if a.host:
            self.host, self.admins = a.host, list(a.admin)
            self.flags = Path(a.flags_file) if a.flags_file else Path()
            if moved and not a.flags_file:
                raise SystemExit("--host with cutovers needs --flags-file (or --no-cutovers)")
            initial_new = list(a.initial_new or [])
        else:
            self.start_stack(initial_new, moved)
        (self.out / "plan.json").write_text(
            json.dumps({"initial_new": initial_new, "singles": singles, "waves": waves}, indent=1)
        )
        env = dict(self.env)
        env.update(
            LOADTEST_DAY_SECONDS=str(a.duration),
            LOADTEST_SCALE=str(a.scale),
            LOADTEST_CLIENT_LOG=str(self.out / "client.jsonl"),
            LOCUST_TENANTS=str(a.tenants),
        )
        locust = self.start(
            "locust",
            [
                *(PY, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless"),
                *("--host", self.host, "--csv", str(self.out / "locust"), "--csv-full-history"),
                *("--html", str(self.out / "locust.html"), "--loglevel", "WARNING"),
                "--only-summary",
            ],
            env=env,
        )
        begin = time.monotonic()
        threads = [threading.Thread(target=self.run_singles, args=(singles, begin), daemon=True)]
        for i, wave in enumerate(waves):
            at = begin + a.duration * (0.15 + 0.55 * i / max(1, len(waves) - 1))
            threads.append(
                threading.Thread(target=self.run_wave, args=(i + 1, wave, at), daemon=True)
            )
        for thread in threads:
            thread.start()
        try:
            locust.wait(timeout=a.duration + 60)
        except subprocess.TimeoutExpired:
            self.say("locust outlived the day by 60 s: stopping it")
        self.stop_event.set()
        for thread in threads:
            thread.join(timeout=120)
        self.say(f"locust exit {locust.poll()}; stopping the stack")
        self.stop_all()
        return self.judge(initial_new)

    def judge(self, initial_new: list[str]) -> int:
        a = self.args
        client = verdict.read_jsonl(self.out / "client.jsonl")
        if a.host:
            backend = []
            for path in a.records or []:
                backend += verdict.read_jsonl(Path(path))
            if not a.records:
                backend = [
                    {"ts": r["t"], "side": r["side"], "tenant": r["tenant"], "seq": r["seq"]}
                    for r in client
                    if "seq" in r and r.get("side")
                ]
        else:
            backend = verdict.read_jsonl(self.out / "legacy.jsonl")
            backend += verdict.read_jsonl(self.out / "new.jsonl")
        result = verdict.judge(
            client,
            backend,
            self.cutovers,
            expected_requests=shape.expected_requests(a.duration, a.scale),
            duration=a.duration,
            initial_new=initial_new,
        )
        result["run"] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "host": getattr(self, "host", None),
            "tenants": a.tenants,
            "scale": a.scale,
            "mean_rate_target": round(shape.mean_rate(a.scale), 1),
            "peak_rate_target": round(shape.peak_rate(a.scale), 1),
            "nproc": os.cpu_count(),
            "output": str(self.out),
        }
        (self.out / "verdict.json").write_text(json.dumps(result, indent=2) + "\n")
        starts = [r for r in client if r.get("event") == "start"]
        if starts:
            import chart

            chart.draw(
                self.out / "chart.png",
                client,
                self.cutovers,
                t0=float(starts[0]["t"]),
                duration=a.duration,
                target=lambda t: shape.target_rate(t, a.duration, a.scale),
                title=(
                    f"router load test {result['run']['date']}: {a.duration:.0f} s day, scale "
                    f"{a.scale}, {len(self.cutovers)} cutovers - verdict "
                    f"{'PASS' if result['ok'] else 'FAIL'}"
                ),
            )
        print(json.dumps(result, indent=2))
        self.say(f"verdict {'PASS' if result['ok'] else 'FAIL'}: {self.out / 'verdict.json'}")
        return 0 if result["ok"] else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds the day lasts (600)")
    p.add_argument("--scale", type=float, default=1.0, help="rate factor (1: mean 220/s)")
    p.add_argument("--tenants", type=int, default=10_000)
    p.add_argument("--move-share", type=float, default=0.2, help="share of tenants moved (0.2)")
    p.add_argument("--busy", type=int, default=5, help="busiest tenants always moved (5)")
    p.add_argument("--singles", type=int, default=20, help="tenants moved one at a time (20)")
    p.add_argument("--waves", type=int, default=4, help="router migrate waves (4)")
    p.add_argument("--concurrency", type=int, default=8, help="router migrate --concurrency")
    p.add_argument("--initial-new-share", type=float, default=0.1, help="tenants on new at start")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="output folder (default loadtests/results/<UTC time>)")
    p.add_argument("--inject-error-rate", type=float, default=0.0)
    p.add_argument("--inject-latency-ms", type=float, default=0.0)
    p.add_argument("--inject-sides", nargs="+", default=["legacy", "new"])
    p.add_argument("--no-cutovers", action="store_true")
    p.add_argument(
        "--shadow-rate",
        type=float,
        default=0.0,
        help="shadow the tenants to be moved at this sample rate (local stack; 0: off)",
    )
    ext = p.add_argument_group("a deployed router (instead of the local stack)")
    ext.add_argument("--host", help="the router's proxy URL")
    ext.add_argument("--admin", action="append", default=[], help="a router's admin URL")
    ext.add_argument("--flags-file", help="the flag file the routers read")
    ext.add_argument("--initial-new", nargs="*", help="tenants already on new")
    ext.add_argument("--records", nargs="*", help="recording backends' JSON-lines files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    harness = Harness(args)

    def on_signal(signum: int, _: Any) -> None:
        harness.stop_event.set()
        harness.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return harness.run()
    except (RuntimeError, OSError) as exc:
        harness.say(f"setup error: {exc}")
        return 2
    finally:
        harness.stop_event.set()
        harness.stop_all()
        shutil.rmtree(harness.out / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
