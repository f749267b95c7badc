"""`router sign` as a process, and the shell recipe in router/control/override.py's
docstring run through openssl: the headers they produce are accepted by the verifier."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time

import pytest

from router.control.override import (
    SIGNATURE_HEADER,
    TARGET_HEADER,
    OverrideVerifier,
)
from tests.support.procs import run_router
from tests.support.signing import NOW, SECRET, WINDOW, verifier


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_recipe_from_the_docstring() -> None:
    """The shell recipe for other languages (module docstring) produces a valid header."""
    out = subprocess.run(
        ["sh", "-c", 'printf \'legacy\\nglobex\\n%s\' "$T" | openssl dgst -sha256 -hmac "$S" -r'],
        env={"T": str(NOW), "S": SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mac = out.split()[0]
    assert verifier().verify("legacy", f"t={NOW},v1={mac}", "globex") == "legacy"


def sign_cli(
    *args: str, secret: str | None = SECRET, env_name: str = "ROUTER_OVERRIDE_SECRET"
) -> subprocess.CompletedProcess[str]:
    env = {env_name: secret} if secret is not None else {}
    return run_router("sign", *args, env=env)


def assert_fresh_and_valid(headers: dict[str, str], target: str, tenant: str) -> None:
    assert headers[TARGET_HEADER] == target
    stamp = int(headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
    assert abs(stamp - time.time()) < 60
    v = OverrideVerifier(SECRET, WINDOW)
    assert v.verify(headers[TARGET_HEADER], headers[SIGNATURE_HEADER], tenant) == target


def test_cli_headers_format() -> None:
    result = sign_cli("acme", "new")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [TARGET_HEADER, SIGNATURE_HEADER]
    assert lines[0] == "X-Router-Target: new"
    assert_fresh_and_valid(dict(line.split(": ", 1) for line in lines), "new", "acme")


def test_cli_curl_format() -> None:
    result = sign_cli("acme", "legacy", "--format", "curl")
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    # Nothing a shell would interpret: `curl $(router sign ...)` splits it the same way.
    assert words == result.stdout.split()
    assert words[0::2] == ["-H", "-H"]
    headers = dict(w.split(":", 1) for w in words[1::2])
    assert_fresh_and_valid(headers, "legacy", "acme")


def test_cli_json_format() -> None:
    result = sign_cli("globex", "new", "--format", "json")
    assert result.returncode == 0, result.stderr
    headers = json.loads(result.stdout)
    assert set(headers) == {TARGET_HEADER, SIGNATURE_HEADER}
    assert_fresh_and_valid(headers, "new", "globex")


def test_cli_secret_env_name() -> None:
    result = sign_cli("acme", "new", "--secret-env", "MY_SECRET", env_name="MY_SECRET")
    assert result.returncode == 0, result.stderr
    assert_fresh_and_valid(
        dict(ln.split(": ", 1) for ln in result.stdout.splitlines()), "new", "acme"
    )
    # ... and then the default variable is not consulted.
    result = sign_cli("acme", "new", "--secret-env", "MY_SECRET")
    assert result.returncode == 2


def test_cli_signs_with_the_current_secret_during_a_rotation() -> None:
    """With both secrets in the environment (a rotation), `router sign` uses the current
    one: the signature verifies with it alone, not with the previous one alone."""
    result = run_router(
        "sign", "acme", "new",
        env={"ROUTER_OVERRIDE_SECRET": SECRET, "ROUTER_OVERRIDE_SECRET_PREVIOUS": "old-one"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    headers = dict(ln.split(": ", 1) for ln in result.stdout.splitlines())
    assert_fresh_and_valid(headers, "new", "acme")
    previous_only = OverrideVerifier("old-one", WINDOW)
    assert previous_only.verify("new", headers[SIGNATURE_HEADER], "acme") is None


@pytest.mark.parametrize("secret", [None, ""])
def test_cli_missing_secret(secret: str | None) -> None:
    result = sign_cli("acme", "new", secret=secret)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "ROUTER_OVERRIDE_SECRET" in result.stderr


def test_cli_takes_no_secret_argument() -> None:
    result = sign_cli("acme", "new", "--secret", SECRET)
    assert result.returncode == 2
    assert SECRET not in result.stdout


@pytest.mark.parametrize("tenant", ["a b", "x" * 129, "acme/../x", "é"])
def test_cli_invalid_tenant(tenant: str) -> None:
    result = sign_cli(tenant, "new")
    assert result.returncode == 2
    assert "not a valid tenant id" in result.stderr
    assert result.stdout == ""


def test_cli_invalid_target() -> None:
    assert sign_cli("acme", "hold").returncode == 2
