"""Phase 5: one JSON line per request on stdout, and JSON application logs.

The line holds what an SRE needs to follow one request across the router and a backend
(request id, tenant, side, reason, status, sizes, times, error code) and nothing secret:
no headers at all (so no Authorization, no cookies), and the path with its query string
redacted (QueryRedactor): every parameter name is kept, the values of sensitive ones
(`redact_query_params`: jwt, token, ...) become `REDACTED`. The same redactor cleans the
paths of shadow mismatches (their log line, /admin/shadow, `router shadow report`).

Lines are buffered and written in one syscall per batch (at most 50 ms late): a write per
request would cost more than the rest of the record phase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import sys
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import IO, Any, Final
from urllib.parse import unquote_plus

_escape: Final = encode_basestring_ascii
_FLUSH_DELAY: Final = 0.05
_FLUSH_LINES: Final = 256


def _decimal3(value: float) -> str:
    """`value` (>= 0) with three decimals, as format(value, ".3f") writes it but for a tie
    rounded up (a thousandth at most), from integers: compiled, int-to-str costs a fraction
    of the float formatter, and a line has three of these."""
    scaled = int(value * 1000.0 + 0.5)
    fraction = scaled % 1000
    if fraction >= 100:
        return f"{scaled // 1000}.{fraction}"
    if fraction >= 10:
        return f"{scaled // 1000}.0{fraction}"
    return f"{scaled // 1000}.00{fraction}"


def _format(
    ts: float,
    request_id: str,
    tenant: str | None,
    side: str,
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
) -> str:
    """One JSON line. An f-string, not json.dumps of a dict (a fifth of the cost).
    Fields that can carry client bytes (tenant, path, client) are escaped by json's own C
    encoder (tenant and client through a small cache: they repeat); the others come from
    fixed vocabularies or were validated (request id: _REQUEST_ID in relay.py; method: an
    HTTP token). Compiled (setup.py), an f-string whose parts are all str or int is one
    concatenation; one format spec in it would make every part a str.format() call."""
    escaped = _ESCAPED
    tenant_json = escaped.get(tenant)
    if tenant_json is None:
        tenant_json = _escape_cached(tenant)
    client_json = escaped.get(client)
    if client_json is None:
        client_json = _escape_cached(client)
    upstream = "null" if upstream_ms is None else _decimal3(upstream_ms)
    error_json = "null" if error is None else f'"{error}"'
    path_json: str = _escape(path)
    # The side is in the field named "target": log pipelines parse that name.
    return (
        f'{{"ts":{_decimal3(ts)},"type":"access","request_id":"{request_id}",'
        f'"tenant":{tenant_json},"target":"{side}","reason":"{reason}",'
        f'"method":"{method}","path":{path_json},"status":{status},"bytes_in":{bytes_in},'
        f'"bytes_out":{bytes_out},"duration_ms":{_decimal3(duration_ms)},'
        f'"upstream_ms":{upstream},"error":{error_json},"client":{client_json}}}\n'
    )


# str (or None) -> its JSON form; tenants and client addresses repeat from line to line.
_ESCAPED: dict[str | None, str] = {None: "null"}


def _escape_cached(value: str | None) -> str:
    if value is None:
        return "null"
    if len(_ESCAPED) >= 4096:  # bounded: both come from clients
        _ESCAPED.clear()
        _ESCAPED[None] = "null"
    result = _ESCAPED[value] = _escape(value)
    return result


REDACTED: Final = "REDACTED"
# `&` and `;`: some backends' frameworks split the query on either, so a value after a `;`
# is a parameter to them and must be judged as one here; and `?`: a second one (`?a=1?jwt=`)
# is part of a value to most parsers, but a careless client's token may follow it.
_QUERY_SEPARATORS: Final = re.compile(r"([&;?])")
# A longer parameter name is not a name a client chose for its meaning: logged as REDACTED.
_MAX_NAME: Final = 64


class QueryRedactor:
    """A path with its query's sensitive values replaced by `REDACTED`, for logs and admin
    views. What the backend receives is never changed.

    - `/a?page=2&jwt=eyJ...&Token=x` -> `/a?page=2&jwt=REDACTED&Token=REDACTED`: names are
      kept (and how they were written), separators too;
    - a name is sensitive when, percent-decoded and lower-cased, it contains one of
      `words` (`%6Awt`, `access_token` and `X-Amz-Signature` all match); `"*"` in `words`
      makes every value sensitive;
    - fail closed: a segment without `=` (a bare value: `?eyJ...`), an empty name and a
      name over 64 characters are replaced whole.

    No state per call and no cache (nothing to grow); a path without `?` costs one find().
    """

    __slots__ = ("_every", "_words")

    def __init__(self, words: Sequence[str]) -> None:
        self._every = "*" in words
        self._words: tuple[str, ...] = tuple(w.lower() for w in words if w != "*")

    def redact(self, path: str) -> str:
        qmark = path.find("?")
        if qmark < 0:
            return path
        parts = _QUERY_SEPARATORS.split(path[qmark + 1 :])
        # Segments at even indexes, separators at odd ones.
        for index in range(0, len(parts), 2):
            segment = parts[index]
            if segment:
                parts[index] = self._segment(segment)
        return path[: qmark + 1] + "".join(parts)

    def _segment(self, segment: str) -> str:
        equals = segment.find("=")
        if equals <= 0 or equals > _MAX_NAME:
            return REDACTED  # no name, or not one: the whole segment could be the secret
        name = segment[:equals]
        if self._every or self.sensitive(name):
            return name + "=" + REDACTED
        return segment

    def sensitive(self, name: str) -> bool:
        """Whether the values of parameter `name` (as written in the query) are redacted."""
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        name = name.lower()
        for word in self._words:
            if word in name:
                return True
        return self._every


class AccessLog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sample_rate: float = 1.0,
        stream: IO[bytes] | None = None,
        enabled: bool = True,
        redactor: QueryRedactor | None = None,
    ) -> None:
        self.enabled = enabled
        # None: the query is dropped whole (the fail-closed default for a bare AccessLog).
        self._redactor = redactor
        self._loop = loop
        self._sample_rate = sample_rate
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._buffer: list[str] = []  # formatted lines, written by flush()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._random = random.random

    def record(
        self,
        request_id: str,
        tenant: str | None,
        side: str,
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
        qmark = path.find("?")
        if qmark >= 0:  # only then is there work: most requests have no query
            redactor = self._redactor
            path = path[:qmark] if redactor is None else redactor.redact(path)
        buffer = self._buffer
        buffer.append(
            _format(time.time(), request_id, tenant, side, reason, method, path, status,
                    bytes_in, bytes_out, duration_ms, upstream_ms, error, client)
        )  # fmt: skip
        if len(buffer) >= _FLUSH_LINES:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(_FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        buffer = self._buffer
        if not buffer:
            return
        self._buffer = []
        data = "".join(buffer).encode()
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
