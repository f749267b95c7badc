"""Phase 5: one JSON line per request on stdout, and JSON application logs.

The line holds what an SRE needs to follow one request across the router and a backend
(request id, tenant, side, reason, status, sizes, times, error code) and nothing secret:
no headers at all (so no Authorization, no cookies) and the path without its query string
(so no `jwt` parameter).

Lines are buffered and written in one syscall per batch (at most 50 ms late): a write per
request would cost more than the rest of the record phase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from typing import IO, Any, Final

_FLUSH_DELAY: Final = 0.05
_FLUSH_BYTES: Final = 64 * 1024


class AccessLog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sample_rate: float = 1.0,
        stream: IO[bytes] | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self._loop = loop
        self._sample_rate = sample_rate
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._random = random.random

    def record(
        self,
        request_id: str,
        tenant: str | None,
        target: str,
        reason: str,
        method: str,
        path: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration_ms: float,
        upstream_ms: float | None,
        error: str | None,
        client: str | None,
    ) -> None:
        if not self.enabled:
            return
        if (
            error is None
            and status < 500
            and self._sample_rate < 1.0
            and self._random() >= self._sample_rate
        ):
            return
        line = (
            json.dumps(
                {
                    "ts": round(time.time(), 3),
                    "type": "access",
                    "request_id": request_id,
                    "tenant": tenant,
                    "target": target,
                    "reason": reason,
                    "method": method,
                    "path": path,
                    "status": status,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "duration_ms": round(duration_ms, 3),
                    "upstream_ms": None if upstream_ms is None else round(upstream_ms, 3),
                    "error": error,
                    "client": client,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= _FLUSH_BYTES:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(_FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): losing log lines must not fail requests


class JsonFormatter(logging.Formatter):
    """Application logs as JSON lines: ts, level, logger, msg, plus any `extra` fields."""

    _RESERVED: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
        "message", "asctime", "taskName",
    }  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._RESERVED:
                entry[key] = (
                    value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
                )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every premature client disconnect at debug; its access log is ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
