"""Packaging consistency: Dockerfile, docker-compose.yml, Makefile and .ci/run against
config/router.yaml and docs/contracts.md (the demo backend on a real socket and the
wheel are in tests/system/test_packaging_build.py).

There is no Docker engine here, so the Dockerfile and the compose file are checked by
parsing them: each test names the mismatch that would break `docker compose up` or the
container's health check.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from router.settings import Settings, load_settings
from tests.support.contract_doc import env_contract
from tests.support.paths import REPO

CONFIG = "config/router.yaml"
FLAGS = "config/flags.json"


# --- parsers -----------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions `(NAME, args)` grouped by build stage (each FROM starts one)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (also inside a continued instruction) and blank lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        name, _, args = pending.partition(" ")
        instructions.append((name.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    stages: list[list[tuple[str, str]]] = []
    for name, args in instructions:
        if name == "FROM":
            stages.append([])
        assert stages, f"{name} before the first FROM"
        stages[-1].append((name, args))
    return stages


def exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT argument list: JSON (exec) form, else shell words."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


def only(stage: list[tuple[str, str]], name: str) -> str:
    values = [args for instr, args in stage if instr == name]
    assert values, f"the final stage has no {name}"
    return values[-1]  # as Docker does: the last one wins


def makefile_recipe(text: str, target: str) -> str:
    """The recipe of `target` with the file's simple variables ($(NAME)) expanded."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$", line)
        if m:
            variables[m.group(1)] = m.group(2).strip()

    def expand(value: str) -> str:
        for _ in range(10):
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: variables.get(m.group(1), m.group(0)),
                value,
            )
        return value.replace("$$", "$")

    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^{re.escape(target)}\s*:(?!=)", line):
            recipe = []
            for body in lines[i + 1 :]:
                if not body.startswith("\t"):
                    break
                recipe.append(body[1:])
            return expand("\n".join(recipe))
    raise AssertionError(f"the Makefile has no {target!r} target")


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / CONFIG, env={})


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    assert len(stages) >= 2, "expected a multi-stage build (builder + final)"
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data["services"]  # type: ignore[no-any-return]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["NAME=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in service.get("ports") or []:
        parts = str(spec).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else 0
    return out


def _arg(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _readyz_port(text: str) -> int:
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/readyz\b", text)
    assert m, f"no http://127.0.0.1:PORT/readyz in {text!r}"
    return int(m.group(1))


# --- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_exposes_the_configured_ports(
    final_stage: list[tuple[str, str]], settings: Settings
) -> None:
    exposed = {
        int(port.split("/")[0])
        for name, args in final_stage
        if name == "EXPOSE"
        for port in args.split()
    }
    assert exposed == {settings.server.listen_addr[1], settings.server.admin_addr[1]}


def image_file_source(final_stage: list[tuple[str, str]], in_image: str) -> Path:
    """The repo file that the final stage's WORKDIR and COPY (not COPY --from) put at the
    absolute path `in_image`; fails if none does, if it is missing or .dockerignore'd."""
    workdir, source = "/", None
    for name, args in final_stage:
        if name == "WORKDIR":
            workdir = os.path.join(workdir, args)
        if name == "COPY" and "--from" not in args:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            *sources, dest = words
            dest = os.path.join(workdir, dest)
            for src in sources:
                if dest.endswith("/") and in_image.startswith(dest):
                    source = Path(src) / in_image[len(dest) :]
                elif in_image == dest.rstrip("/"):
                    source = Path(src)
    assert source is not None, f"no COPY puts anything at {in_image}"
    assert (REPO / source).is_file(), f"{in_image} would come from {source}, which is missing"
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for pattern in ignored:
        for part in (source, *source.parents):
            assert not fnmatch(str(part), pattern), f".dockerignore {pattern!r} drops {source}"
    return source


def test_dockerfile_command_serves_a_config_that_is_in_the_image(
    final_stage: list[tuple[str, str]],
) -> None:
    assert exec_form(only(final_stage, "ENTRYPOINT")) == ["router"]
    cmd = exec_form(only(final_stage, "CMD"))
    assert cmd[0] == "serve"
    image_file_source(final_stage, _arg(cmd, "--config"))


def test_dockerfile_healthcheck_asks_admin_readyz(
    final_stage: list[tuple[str, str]], settings: Settings
) -> None:
    check = only(final_stage, "HEALTHCHECK")
    assert "CMD" in check
    assert _readyz_port(check) == settings.server.admin_addr[1]


def test_dockerfile_runs_as_non_root_with_sigterm(final_stage: list[tuple[str, str]]) -> None:
    user = only(final_stage, "USER").split(":")[0]
    assert user not in ("root", "0", "")
    if user != "10001":
        runs = "\n".join(args for name, args in final_stage if name == "RUN")
        created = re.search(rf"useradd\b[^\n]*--uid 10001\b[^\n]*\s{re.escape(user)}\b", runs)
        assert created, f"user {user!r} is not created with uid 10001"
    assert only(final_stage, "STOPSIGNAL") == "SIGTERM"
    path = only(final_stage, "ENV")
    assert "PATH=/opt/venv/bin:" in path, "the venv's router script must be on PATH"
    assert any(
        name == "COPY" and "--from=" in args and "/opt/venv" in args for name, args in final_stage
    ), "the final stage must copy /opt/venv from the builder"


# --- docker-compose.yml ------------------------------------------------------------------


def test_compose_publishes_the_configured_ports(
    compose: dict[str, Any], settings: Settings
) -> None:
    router = compose["router"]
    assert router.get("build") in (".", {"context": "."})
    listen, admin = settings.server.listen_addr[1], settings.server.admin_addr[1]
    assert _published(router) == {listen: listen, admin: admin}


def test_compose_upstreams_point_at_the_backend_services(
    compose: dict[str, Any], settings: Settings
) -> None:
    router = compose["router"]
    env = _env(router)
    applied = load_settings(REPO / CONFIG, env=env)
    depends = router.get("depends_on") or []
    for var, side in (("ROUTER_LEGACY_URL", "legacy"), ("ROUTER_NEW_URL", "new")):
        url = urlsplit(env[var])
        upstream = getattr(applied.upstreams, side)
        assert upstream.url == env[var], f"{var} is not what the router would use"
        backend = compose.get(url.hostname or "")
        assert backend is not None, f"{var} names host {url.hostname!r}: no such service"
        assert backend.get("image") == router.get("image"), "backends run the router image"
        argv = backend.get("entrypoint")
        assert isinstance(argv, list) and "router.demo_backend" in argv
        assert _arg(argv, "--port") == str(url.port), f"{var} port != {url.hostname} --port"
        assert _arg(argv, "--side") == side
        assert _arg(argv, "--host") == "0.0.0.0", "a backend must listen beyond loopback"
        assert url.hostname in depends


def test_compose_flags_file_is_the_mounted_config(compose: dict[str, Any]) -> None:
    router = compose["router"]
    flags = _env(router)["ROUTER_FLAGS_FILE"]
    host_path = None
    for volume in router.get("volumes") or []:
        src, dest = str(volume).split(":")[:2]
        if flags.startswith(dest.rstrip("/") + "/"):
            host_path = Path(src) / flags[len(dest.rstrip("/")) + 1 :]
    assert host_path is not None, f"ROUTER_FLAGS_FILE {flags} is not in a mounted directory"
    assert (REPO / host_path).resolve() == (REPO / FLAGS).resolve()
    assert (REPO / FLAGS).is_file(), f"{FLAGS} (the demo flags) is missing"


def test_compose_healthcheck_asks_admin_readyz(compose: dict[str, Any], settings: Settings) -> None:
    test = compose["router"]["healthcheck"]["test"]
    assert (
        _readyz_port(" ".join(test) if isinstance(test, list) else test)
        == (settings.server.admin_addr[1])
    )


def test_compose_env_vars_are_contract_names(compose: dict[str, Any]) -> None:
    router_image = compose["router"].get("image")
    names = {
        name
        for service in compose.values()
        if service.get("image") == router_image
        for name in _env(service)
    }
    assert names, "the router service sets no environment"
    unknown = names - env_contract()
    assert not unknown, f"not in docs/contracts.md's environment variables: {sorted(unknown)}"


def compose_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(repo path, container path) of each bind mount from the repo (`./...`), short or
    long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type", "bind") != "bind":
                continue
            src, dest = str(volume["source"]), str(volume["target"])
        else:
            src, dest = str(volume).split(":")[:2]
        if src.startswith(("./", "../")) or src == ".":
            mounts.append((Path(src), dest))
    return mounts


def test_compose_mounted_files_exist(compose: dict[str, Any]) -> None:
    """Every file or directory a service mounts from the repo is in the repo: a missing one
    makes Docker create an empty directory in its place, and the service then fails (or,
    worse, runs with its image's default config)."""
    found = 0
    for name, service in compose.items():
        for src, dest in compose_mounts(service):
            found += 1
            path = (REPO / src).resolve()
            assert path.is_relative_to(REPO), f"{name}: {src} is outside the repo"
            assert path.exists(), f"service {name} mounts {src} on {dest}: not in the repo"
            suffix = Path(dest).suffix
            if suffix:  # a file mounted on a file path, not a directory
                assert path.is_file(), f"service {name}: {src} should be a file for {dest}"
    assert found, "no service mounts anything from the repo"


def test_compose_command_files_are_mounted(compose: dict[str, Any]) -> None:
    """A file a service's command names (`-f FILE`, `--config.file=FILE`) is under one of its
    mounts, and that repo file exists (locust's locustfile, Prometheus's config)."""
    checked = 0
    for name, service in compose.items():
        command = service.get("command")
        if not isinstance(command, list):
            continue
        files = []
        for i, word in enumerate(command):
            if word == "-f" and i + 1 < len(command):
                files.append(command[i + 1])
            elif word.startswith("--config.file="):
                files.append(word.partition("=")[2])
        for file in files:
            repo_path = None
            for src, dest in compose_mounts(service):
                dest = dest.rstrip("/")
                if file == dest:
                    repo_path = src
                elif file.startswith(dest + "/"):
                    repo_path = src / file[len(dest) + 1 :]
            assert repo_path is not None, f"service {name}: {file} is in no mounted directory"
            assert (REPO / repo_path).is_file(), f"service {name}: {file} is {repo_path}: missing"
            checked += 1
    assert checked, "expected the locust and prometheus services to name their files"


# --- Makefile and CI ---------------------------------------------------------------------


def test_make_run_uses_the_demo_config_and_backend_ports(settings: Settings) -> None:
    recipe = makefile_recipe((REPO / "Makefile").read_text(), "run")
    assert re.search(rf"router serve --config {re.escape(CONFIG)}\b", recipe)
    assert re.search(rf"router flags set \w+ new --file {re.escape(FLAGS)}\b", recipe)
    assert settings.flags.file == (REPO / FLAGS).resolve(), "router.yaml must use config/flags.json"
    backends = dict(re.findall(r"demo_backend --side (\w+) .*?--port (\d+)", recipe))
    assert backends == {
        "legacy": str(settings.upstreams.legacy.port),
        "new": str(settings.upstreams.new.port),
    }
    assert "trap " in recipe, "backends must be stopped when the router exits"


def test_ci_runs_make_test() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    assert re.search(r"^make test$", script, re.M)
    recipe = makefile_recipe((REPO / "Makefile").read_text(), "test")
    assert "pytest" in recipe


# --- the compiled hot path (setup.py) ------------------------------------------------------


def test_make_test_and_ci_run_the_compiled_hot_path() -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in ("test", "run", "bench", "loadtest", "loadtest-smoke", "soak"):
        assert re.search(rf"^{target}: compile$", makefile, re.M), f"make {target}: not compiled"
    assert "setup.py" in makefile_recipe(makefile, "compile")
    # A C compiler with libc's headers, installed when missing.
    assert re.search(r"^need_debs .*\bgcc:build-essential\b", (REPO / ".ci/run").read_text(), re.M)


def test_the_image_builder_compiles_and_checks_the_hot_path() -> None:
    builder = dockerfile_stages((REPO / "Dockerfile").read_text())[0]
    runs = " && ".join(args for name, args in builder if name == "RUN")
    assert re.search(r"apt-get install .*\bgcc\b.*\blibc6-dev\b", runs)
    assert re.search(r"ROUTER_COMPILE=1 \S+pip wheel --no-build-isolation", runs)
    assert "python -m router.service.native" in runs, (
        "the build must fail if the image is not compiled"
    )
    copied = " ".join(args for name, args in builder if name == "COPY")
    assert "setup.py" in copied
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "**/*.so" in ignored and "router/_compiled.py" in ignored, "a checkout's own build"
