"""Flag writers: how the cutover tools read and move one tenant's routing flag.

`FlagWriter` is the one interface `router cutover` / `router migrate` (cutover.py) use:

    await writer.get(tenant)          -> "legacy" | "hold" | "new" (what the flag serves it)
    await writer.set(tenant, value)   # route the tenant to value; a no-op if it already is
    writer.describe()                 -> "flags file /x/flags.json (tenant-routing)"

Two implementations:

- `FileFlagWriter`: the local flag file (router/control/flagfile.py: atomic, locked, version-bumped
  writes), called through `asyncio.to_thread` so a slow disk never stalls the event loop
  that polls the routers' admin ports.
- `LaunchDarklyFlagWriter`: LaunchDarkly's REST API v2 over `httpx.AsyncClient`.

LaunchDarkly REST API shapes used here (from LaunchDarkly's API reference,
launchdarkly.com/docs/api, and the generated clients in github.com/launchdarkly/api-client-*):

- Authentication: `Authorization: <access token>` (the raw token, no "Bearer"); the API
  version is pinned per request with `LD-API-Version: 20240415` ("Best practice: set the
  header for every client or integration", docs "Versioning").
- Read: `GET /api/v2/flags/{projectKey}/{featureFlagKey}?env={environmentKey}` ("Get feature
  flag": `env` restricts the returned configurations to that environment). The flag has
  `variations: [{"_id", "value", "name"?}]` (api-client-python `Variation.attribute_map`:
  `id` <-> `_id`) and `environments: {envKey: FeatureFlagConfig}` where the config has
  `on`, `offVariation`, `fallthrough: {"variation"} | {"rollout"}`, `rules`,
  `prerequisites`, `targets` (individual targets of context kind `user`) and
  `contextTargets` (individual targets of every other context kind) as
  `[{"contextKind", "variation": <index into variations>, "values": [keys]}]`
  (api-client-java docs/FeatureFlagConfig.md, docs/Target.md).
- Write: `PATCH /api/v2/flags/{projectKey}/{featureFlagKey}` with
  `Content-Type: application/json; domain-model=launchdarkly.semanticpatch` ("Update
  feature flag", "Using semantic patches on a feature flag") and the body
  `{"environmentKey", "comment", "instructions": [...]}` where
  `{"kind": "removeTargets", "contextKind", "variationId", "values"}` removes context keys
  from a variation's individual targets ("does nothing if the flag does not target the
  context keys") and `{"kind": "addTargets", "contextKind", "variationId", "values"}` adds
  them ("returns an error if this causes the flag to target the same context key in
  multiple variations": hence remove and add in ONE patch, applied atomically).
- Errors: JSON `{"code", "message", "id"}`; 401 bad token, 403 token lacks the permission,
  404 no such project/flag, 409 "conflicted with a concurrent API request. Retry your
  request.", 429 rate limited with `Retry-After` (seconds) on IP-based limits or
  `X-Ratelimit-Reset` (epoch milliseconds) on global/route limits (docs "Rate limiting":
  "wait at least Retry-After seconds ... employ jitter and backoff").
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

from router.control.flagfile import (
    CONTEXT_KIND,
    DEFAULT_FLAG_KEY,
    FlagFileError,
    read_flag_file,
    set_tenant,
    tenant_variation,
)
from router.domain import DEFAULT_TENANT_ID_MAX_LENGTH, FLAG_VALUES, tenant_id_problem

SEMANTIC_PATCH: Final = "application/json; domain-model=launchdarkly.semanticpatch"
LD_API_VERSION: Final = "20240415"
LD_BASE_URL: Final = "https://app.launchdarkly.com"


class FlagWriterError(Exception):
    """The flag could not be read or written; the message says why and what to check."""


@runtime_checkable
class FlagWriter(Protocol):
    async def get(self, tenant: str) -> str:
        """The variation the flag serves `tenant` now: legacy, hold or new."""
        ...

    async def set(self, tenant: str, value: str) -> None:
        """Route `tenant` to `value` (individual target); nothing if it already is."""
        ...

    def describe(self) -> str:
        """Where the flag lives, for humans (never a secret)."""
        ...


def _check(tenant: str, tenant_max_length: int, value: str | None = None) -> None:
    problem = tenant_id_problem(tenant, tenant_max_length)
    if problem is not None:
        raise FlagWriterError(problem)
    if value is not None and value not in FLAG_VALUES:
        raise FlagWriterError(f"variation must be one of {', '.join(FLAG_VALUES)}; got {value!r}")


# ---- the flag file ----------------------------------------------------------------------


class FileFlagWriter:
    """The local flag file (router.control.flagfile), off the event loop. Tenant ids must
    pass the router's rule with the routers' `tenant.max_length` (`tenant_max_length`)."""

    def __init__(
        self,
        path: Path | str,
        flag_key: str = DEFAULT_FLAG_KEY,
        *,
        tenant_max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH,
    ) -> None:
        self.path = Path(path)
        self.flag_key = flag_key
        self.tenant_max_length = tenant_max_length

    def describe(self) -> str:
        return f"flags file {self.path} (flag {self.flag_key})"

    async def get(self, tenant: str) -> str:
        _check(tenant, self.tenant_max_length)
        try:
            data = await asyncio.to_thread(read_flag_file, self.path)
            return tenant_variation(data, tenant, self.flag_key)
        except FlagFileError as exc:
            raise FlagWriterError(str(exc)) from None

    async def set(self, tenant: str, value: str) -> None:
        _check(tenant, self.tenant_max_length, value)
        try:
            await asyncio.to_thread(
                set_tenant,
                self.path,
                tenant,
                value,
                self.flag_key,
                tenant_max_length=self.tenant_max_length,
            )
        except FlagFileError as exc:
            raise FlagWriterError(str(exc)) from None

    async def aclose(self) -> None:
        return None


# ---- LaunchDarkly -----------------------------------------------------------------------


class LaunchDarklyFlagWriter:
    """The flag in LaunchDarkly, through its REST API v2 (see the module docstring).

    Retries, bounded by `max_attempts` per call: 429 (waiting what Retry-After or
    X-Ratelimit-Reset says, capped at `max_wait`), 409 and 5xx (exponential backoff with
    jitter), and connection failures. Anything else is a FlagWriterError at once.
    """

    def __init__(
        self,
        api_token: str,
        project_key: str,
        environment_key: str,
        flag_key: str = DEFAULT_FLAG_KEY,
        base_url: str = LD_BASE_URL,
        *,
        timeout: float = 15.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_wait: float = 60.0,
        client: httpx.AsyncClient | None = None,
        tenant_max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH,
    ) -> None:
        if not api_token:
            raise FlagWriterError("no LaunchDarkly API access token (LAUNCHDARKLY_API_TOKEN)")
        for name, value in (("project", project_key), ("environment", environment_key)):
            if not value:
                raise FlagWriterError(f"LaunchDarkly {name} key is empty")
        self.project_key = project_key
        self.environment_key = environment_key
        self.flag_key = flag_key
        self.tenant_max_length = tenant_max_length
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.max_wait = max_wait
        self._path = f"/api/v2/flags/{quote(project_key, safe='')}/{quote(flag_key, safe='')}"
        self._headers = {
            "Authorization": api_token,
            "LD-API-Version": LD_API_VERSION,
            "Accept": "application/json",
            "User-Agent": "tenant-router-cutover",
        }
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    def describe(self) -> str:
        return (
            f"LaunchDarkly {self.base_url} project {self.project_key}, "
            f"environment {self.environment_key} (flag {self.flag_key})"
        )

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    # -- reading --

    async def read_flag(self) -> dict[str, Any]:
        """The flag with only our environment's configuration."""
        response = await self._request(
            "GET", self._path, params={"env": self.environment_key}, what="read the flag"
        )
        try:
            flag = response.json()
        except ValueError:
            raise FlagWriterError(
                f"LaunchDarkly: reading flag {self.flag_key}: the answer is not JSON"
            ) from None
        if not isinstance(flag, dict):
            raise FlagWriterError(f"LaunchDarkly: flag {self.flag_key}: unexpected answer")
        return flag

    def _environment(self, flag: dict[str, Any]) -> dict[str, Any]:
        environments = flag.get("environments")
        config = environments.get(self.environment_key) if isinstance(environments, dict) else None
        if not isinstance(config, dict):
            raise FlagWriterError(
                f"LaunchDarkly: flag {self.flag_key} has no configuration for environment "
                f"{self.environment_key!r} in project {self.project_key!r}"
            )
        return config

    def _variation_ids(self, flag: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
        """(values by index, {value: _id}) for the routing variations."""
        variations = flag.get("variations")
        if not isinstance(variations, list) or not all(isinstance(v, dict) for v in variations):
            raise FlagWriterError(f"LaunchDarkly: flag {self.flag_key} has no variations list")
        values = [v.get("value") for v in variations]
        ids = {
            v["value"]: v["_id"]
            for v in variations
            if isinstance(v.get("value"), str) and isinstance(v.get("_id"), str)
        }
        return values, ids

    def _evaluate(self, flag: dict[str, Any], tenant: str) -> str:
        """What the flag serves `tenant`, by the same rules as the flag file: the config is
        shaped like the SDK's flag (the flag file format) and evaluated by flagfile."""
        config = self._environment(flag)
        values, _ = self._variation_ids(flag)
        sdk_flag = {
            "key": self.flag_key,
            "on": config.get("on"),
            "variations": values,
            "offVariation": config.get("offVariation"),
            "fallthrough": config.get("fallthrough") or {},
            "contextTargets": config.get("contextTargets") or [],
            "rules": config.get("rules") or [],
            "prerequisites": config.get("prerequisites") or [],
        }
        where = f"LaunchDarkly {self.project_key}/{self.environment_key}"
        try:
            return tenant_variation({"flags": {self.flag_key: sdk_flag}}, tenant, self.flag_key)
        except FlagFileError as exc:
            raise FlagWriterError(f"{where}: {exc}".replace("flags file: ", "")) from None

    async def get(self, tenant: str) -> str:
        _check(tenant, self.tenant_max_length)
        return self._evaluate(await self.read_flag(), tenant)

    # -- writing --

    async def set(self, tenant: str, value: str) -> None:
        _check(tenant, self.tenant_max_length, value)
        flag = await self.read_flag()
        config = self._environment(flag)
        _, ids = self._variation_ids(flag)
        if value not in ids:
            raise FlagWriterError(
                f"LaunchDarkly: flag {self.flag_key} has no variation with value {value!r} "
                f"(values: {sorted(ids)})"
            )
        if config.get("on") is not True:
            raise FlagWriterError(
                f"LaunchDarkly: flag {self.flag_key} is off in {self.environment_key}; "
                "individual targets would have no effect"
            )
        by_index = [v.get("_id") for v in flag["variations"]]
        targeted = [
            entry.get("variation")
            for entry in config.get("contextTargets") or []
            if isinstance(entry, dict)
            and entry.get("contextKind") == CONTEXT_KIND
            and tenant in (entry.get("values") or [])
        ]
        current_ids = {
            by_index[i] for i in targeted if isinstance(i, int) and 0 <= i < len(by_index)
        }
        if current_ids == {ids[value]}:
            return  # already individually targeted at value: nothing to write
        instructions: list[dict[str, Any]] = [
            {
                "kind": "removeTargets",
                "contextKind": CONTEXT_KIND,
                "variationId": variation_id,
                "values": [tenant],
            }
            for variation_id in sorted(i for i in current_ids if isinstance(i, str))
        ]
        instructions.append(
            {
                "kind": "addTargets",
                "contextKind": CONTEXT_KIND,
                "variationId": ids[value],
                "values": [tenant],
            }
        )
        old = self._evaluate(flag, tenant)
        body = {
            "environmentKey": self.environment_key,
            "comment": f"router cutover: tenant {tenant}: {old} -> {value}",
            "instructions": instructions,
        }
        await self._request(
            "PATCH",
            self._path,
            json=body,
            headers={"Content-Type": SEMANTIC_PATCH},
            what=f"route {tenant} to {value}",
        )

    # -- HTTP with bounded retries --

    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: dict[str, str] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        url = self.base_url + path
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await self._client.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    headers={**self._headers, **(headers or {})},
                )
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                wait = self._backoff(attempt)
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                last = f"{status} {_ld_message(response)}"
                if status == 429:
                    wait = _retry_after(response, self._backoff(attempt), self.max_wait)
                elif status == 409 or status >= 500:
                    wait = self._backoff(attempt)
                else:
                    raise FlagWriterError(self._explain(status, response, what)) from None
            if attempt < self.max_attempts:
                await asyncio.sleep(wait)
        raise FlagWriterError(
            f"LaunchDarkly: could not {what} after {self.max_attempts} attempts; last: {last}"
        )

    def _backoff(self, attempt: int) -> float:
        base: float = min(self.max_wait, self.backoff * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)  # jitter: never a synchronised retry storm

    def _explain(self, status: int, response: httpx.Response, what: str) -> str:
        message = _ld_message(response)
        if status == 401:
            return (
                f"LaunchDarkly rejected the API access token (401 {message}): check "
                "LAUNCHDARKLY_API_TOKEN (an access token, not an SDK key)"
            )
        if status == 403:
            return (
                f"LaunchDarkly: the access token may not {what} (403 {message}): it needs "
                f"a role that can update flag targeting in {self.environment_key}"
            )
        if status == 404:
            return (
                f"LaunchDarkly: no flag {self.flag_key!r} in project {self.project_key!r} "
                f"(404 {message})"
            )
        return f"LaunchDarkly: could not {what}: {status} {message}"


def _ld_message(response: httpx.Response) -> str:
    """LaunchDarkly's `{"code", "message"}` error body, shortened; else the status text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("message") or body.get("code")):
        text = f"{body.get('code', '')}: {body.get('message', '')}".strip(": ")
    else:
        text = response.reason_phrase or response.text[:200]
    return text[:300]


def _retry_after(response: httpx.Response, fallback: float, cap: float) -> float:
    """Seconds to wait on a 429: Retry-After (seconds or HTTP date), else X-Ratelimit-Reset
    (epoch milliseconds), else `fallback`; never more than `cap`."""
    header = response.headers.get("Retry-After")
    wait: float | None = None
    if header:
        try:
            wait = float(header)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(header)
                wait = when.timestamp() - time.time()
            except (TypeError, ValueError):
                wait = None
    if wait is None:
        reset = response.headers.get("X-Ratelimit-Reset")
        if reset:
            try:
                wait = float(reset) / 1000.0 - time.time()
            except ValueError:
                wait = None
    if wait is None:
        wait = fallback
    return min(cap, max(0.0, wait))
