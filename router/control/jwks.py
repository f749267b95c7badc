"""The signing keys of one JWKS URL, for a verifying jwt extractor (router/proxy/identify.py).

Control plane: keys are fetched with aiohttp (never a blocking call on the event loop),
over https with the system's CA store or `verify.ca_file`, every `refresh_interval`, and
at once when a request carries a `kid` we do not know (key rotation), but no more often
than `min_refetch_interval` (a client sending made-up kids must not make us flood the
identity provider). Each key becomes a PyJWT key object once, when fetched; the hot path
only looks keys up by kid (`keys`, a plain dict it reads).

Until the first fetch succeeds `loaded` is False: the router is not ready (/readyz 503) and
a credentialed request gets 503 not_ready, because without keys it can only guess. A
failed refresh later keeps the keys we had (logged): the provider being briefly down must
not take every tenant down with it; a removed key disappears at the next good fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

import aiohttp
import jwt

from router.settings import JwtVerifySettings

log = logging.getLogger("router.jwks")

# A JWKS document is a few kB; anything far larger is not one.
_MAX_DOCUMENT = 1 << 20


class JwksKeys:
    """kid -> PyJWK for one JWKS URL, kept fresh in the background."""

    def __init__(self, settings: JwtVerifySettings) -> None:
        self.settings = settings
        self.url = settings.jwks_url
        self.keys: dict[str, jwt.PyJWK] = {}
        self.loaded = False
        self.fetches = 0  # successful fetches (tests, /readyz detail)
        self._last_attempt = float("-inf")
        self._lock: asyncio.Lock | None = None
        self._loaded_event: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Begin fetching (first fetch now, retried with backoff until it succeeds)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first successful fetch."""
        if not self.loaded:
            if self._loaded_event is None:
                self._loaded_event = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded_event.wait(), timeout)
        return self.loaded

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- fetching ----------------------------------------------------------------------

    async def refetch(self, kid: str) -> None:
        """A request carries `kid`, which we do not know: fetch the document again unless
        it is already known by now or the last attempt was under min_refetch_interval ago."""
        async with self._get_lock():
            if kid in self.keys:
                return
            now = asyncio.get_running_loop().time()
            if now - self._last_attempt < self.settings.min_refetch_interval:
                return
            with contextlib.suppress(Exception):  # _fetch logs; the caller answers 401
                await self._fetch()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self._get_lock():
                    await self._fetch()
                delay = 0.5
                await asyncio.sleep(self.settings.refresh_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Not loaded yet: retry soon (readiness waits on it); loaded: keep the keys.
                await asyncio.sleep(min(delay, self.settings.refresh_interval))
                delay = min(delay * 2, 30.0)

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(cafile=self.settings.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=self.settings.fetch_timeout),
            )
        return self._session

    async def _fetch(self) -> None:
        self._last_attempt = asyncio.get_running_loop().time()
        try:
            async with self._get_session().get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(_MAX_DOCUMENT + 1)
                if len(body) > _MAX_DOCUMENT:
                    raise ValueError("JWKS document too large")
            keys = parse_jwks(body)
        except Exception as exc:
            log.warning(
                "JWKS fetch failed; %s",
                "keeping the keys we have" if self.loaded else "not ready until it succeeds",
                extra={"jwks_url": self.url, "error": str(exc)[:300]},
            )
            raise
        if keys.keys() != self.keys.keys():
            log.info("JWKS keys changed", extra={"jwks_url": self.url, "kids": sorted(keys)})
        self.keys = keys  # one assignment: the hot path sees the old set or the new one
        self.loaded = True
        self.fetches += 1
        if self._loaded_event is not None:
            self._loaded_event.set()


def parse_jwks(body: bytes) -> dict[str, jwt.PyJWK]:
    """kid -> PyJWK for the usable signing keys of a JWKS document. Keys without a kid,
    for encryption, or of a type PyJWT cannot use are skipped; none usable: ValueError."""
    import json

    document: Any = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue  # a shared secret has no place in a public key set
        try:
            keys[kid] = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            log.warning("JWKS key skipped: unusable", extra={"kid": kid})
    if not keys:
        raise ValueError("no usable signing key in the JWKS document")
    return keys
