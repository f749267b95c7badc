"""Worker processes of one router task, and how each reaches its siblings.

`router serve --workers N` runs N processes that share the proxy and admin ports through
SO_REUSEPORT: the kernel hands each connection, a Prometheus scrape or an ALB health check
included, to any one of them. For the admin answers to describe the task rather than one
random worker, every worker also serves a private admin app on a unix socket in a
directory the supervisor creates (`ROUTER_WORKER_DIR`, mode 0700), and the worker that
receives an admin request asks its siblings there: metrics are summed, readiness is the
conjunction, in-flight counts per tenant are summed.

A single-process router has no directory and no siblings: every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

log = logging.getLogger("router.service.workers")

WORKER_ID_ENV: Final = "ROUTER_WORKER_ID"
WORKER_DIR_ENV: Final = "ROUTER_WORKER_DIR"
WORKER_COUNT_ENV: Final = "ROUTER_WORKER_COUNT"
# A sibling that does not answer within this is reported missing rather than waited for:
# a scrape or a health check must not hang on one stuck worker.
SIBLING_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: int
    count: int
    directory: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerInfo | None:
        env = os.environ if environ is None else environ
        if WORKER_DIR_ENV not in env or WORKER_ID_ENV not in env:
            return None
        return cls(
            int(env[WORKER_ID_ENV]), int(env.get(WORKER_COUNT_ENV, "1")), Path(env[WORKER_DIR_ENV])
        )

    def socket_path(self, worker_id: int) -> Path:
        return self.directory / f"worker-{worker_id}.sock"

    @property
    def own_socket(self) -> Path:
        return self.socket_path(self.worker_id)

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.worker_id]


async def ask_siblings(
    worker: WorkerInfo | None, path: str, method: str = "GET"
) -> tuple[dict[int, Any], list[int]]:
    """`method` `path` (JSON) on every sibling's private admin socket, concurrently.

    Returns ({worker id: decoded body}, [ids that did not answer]).
    """
    if worker is None or not worker.siblings:
        return {}, []

    async def one(sibling: int) -> Any:
        connector = aiohttp.UnixConnector(path=str(worker.socket_path(sibling)))
        timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://worker{path}") as response,
        ):
            response.raise_for_status()
            return await response.json()

    results = await asyncio.gather(*(one(s) for s in worker.siblings), return_exceptions=True)
    answers: dict[int, Any] = {}
    missing: list[int] = []
    for sibling, result in zip(worker.siblings, results, strict=True):
        if isinstance(result, BaseException):
            log.warning(
                "sibling worker did not answer",
                extra={"worker": sibling, "path": path, "error": repr(result)[:200]},
            )
            missing.append(sibling)
        else:
            answers[sibling] = result
    return answers, missing
