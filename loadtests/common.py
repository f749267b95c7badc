"""What every server in the bench answers, shared by bench.py and the helper servers.

The helper scripts run as `python loadtests/<name>.py`, so this directory is on their
`sys.path` and `import common` finds this module.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Final

# The fixed small answer: 103 bytes, the size the bench's upstream has always answered
# (docs/benchmarks.md, Method), so figures stay comparable across runs.
SMALL_BODY: Final = b'{"ok":true,"from":"bench fixed upstream","pad":"' + b"x" * 52 + b'"}\n'
assert len(SMALL_BODY) == 103, len(SMALL_BODY)

LARGE_SIZE: Final = 64 * 1024
LARGE_BODY: Final = b"y" * LARGE_SIZE
UPLOAD_SIZE: Final = 1024 * 1024

PATH_SMALL: Final = "/small"
PATH_LARGE: Final = "/64k"  # GET: LARGE_SIZE bytes
PATH_UPLOAD: Final = "/upload"  # POST: the whole body is read, then SMALL_BODY answered

TENANT_HEADER: Final = "X-Tenant-Id"


async def until_stopped() -> None:
    """Return on SIGTERM or SIGINT: how the bench stops the helper servers it starts."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
