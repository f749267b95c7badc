"""`router migrate`'s bookkeeping without processes (router/control/migrate.py): reading the
tenants file, the journal (a torn last line), progress rate and ETA, and the rate limiter."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from router.control.migrate import Journal, MigrateError, Progress, RateLimiter, read_tenants


def test_read_tenants(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("# comment\nbig, 300\n\nsmall,1  # inline\nmid,20\nsmall,2\n")
    entries, warnings = read_tenants(path)
    assert [(e.tenant, e.size) for e in entries] == [("small", 1), ("mid", 20), ("big", 300)]
    assert warnings == [f"{path}:6: small repeats line 4; ignored"]

    path.write_text("b\na\nc\n")
    assert [e.tenant for e in read_tenants(path)[0]] == ["b", "a", "c"]  # file order
    for text, message in [
        ("a,1\nb\n", ":2: no size for b"),
        ("a,-1\n", "non-negative number"),
        ("a,lots\n", "non-negative number"),
        ("a,1,2\n", "expected `tenant` or `tenant,size`"),
    ]:
        path.write_text(text)
        with pytest.raises(MigrateError, match=message):
            read_tenants(path)


def test_journal_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(path)
    journal.open()
    journal.write("started", tenant="a")
    journal.write("done", tenant="a", outcome="moved")
    journal.write("started", tenant="b")
    journal.close()
    with path.open("a") as f:
        f.write('{"ts": 1, "event": "done", "tena')  # the crash hit mid-write
    states, warnings = Journal.load(path)
    assert {t: r["event"] for t, r in states.items()} == {"a": "done", "b": "started"}
    assert len(warnings) == 1
    journal.open()  # appends on a fresh line
    journal.write("done", tenant="b", outcome="moved")
    journal.close()
    states, _ = Journal.load(path)
    assert states["b"]["event"] == "done"
    second = Journal(path)
    journal.open()
    with pytest.raises(MigrateError, match="another `router migrate`"):
        second.open()
    journal.close()


def test_progress_rate_and_eta_come_from_the_last_completions() -> None:
    stream = io.StringIO()
    progress = Progress(100, stream, tty=False, window=5, interval=0)
    now = time.monotonic()
    progress.started = now - 100
    progress.times.extend([now - 40, now - 30, now - 20, now - 10, now])  # 1 per 10 s lately
    progress.done, progress.failed, progress.running = 50, 2, 3
    assert progress.rate() == pytest.approx(0.1)
    line = progress.line()
    assert "50/100 done, 2 failed, 3 running, 6.0/min, ETA 8m20s" in line
    assert line.startswith("[" + "#" * 12 + "." * 12 + "]")
    progress.tick()
    assert stream.getvalue() == f"progress: {line}\n"

    tty = io.StringIO()
    bar = Progress(10, tty, tty=True)
    bar.tick()
    bar.clear()
    assert tty.getvalue().startswith("\r\x1b[2K[") and tty.getvalue().endswith("\r\x1b[2K")


def test_rate_limiter_spaces_starts_evenly() -> None:
    limiter = RateLimiter(120)  # one start every 0.5 s
    assert limiter.delay() == 0
    limiter.take()
    assert 0.4 < limiter.delay() <= 0.5
    assert RateLimiter(0).delay() == 0
