"""Shadow comparison without a router (router/proxy/shadow.py): body digests and
differences, JSON diffs with ignores, ignore paths, noise learning, merging views, and the
pending gauge.
"""

from __future__ import annotations

from typing import Any

from router.proxy.metrics import Metrics
from router.proxy.shadow import (
    Answer,
    BodyDigest,
    Noise,
    body_differences,
    generic_path,
    json_diff,
    merge_views,
    split_ignores,
)


def test_body_digest_keeps_at_most_its_limit() -> None:
    digest = BodyDigest(10)
    digest.feed(b"12345")
    assert digest.captured == bytearray(b"12345")
    digest.feed(b"678901")
    assert digest.captured is None and digest.size == 11
    other = BodyDigest(10)
    other.feed(b"12345678901")
    assert other.hexdigest == digest.hexdigest


def test_json_diff_paths_ignores_and_bounds() -> None:
    legacy = {"a": 1, "b": {"c": [1, 2], "ts": 5}, "gone": True, "n": 1}
    new = {"a": 2, "b": {"c": [1, 3, 4], "ts": 6}, "added": None, "n": 1.0}
    assert json_diff(legacy, new, frozenset(), frozenset()) == [
        "$.a: 1 != 2",
        "$.added: (absent) != null",
        "$.b.c[1]: 2 != 3",
        "$.b.c[2]: (absent) != 4",
        "$.b.ts: 5 != 6",
        "$.gone: true != (absent)",
    ]
    assert json_diff(legacy, new, frozenset({"ts", "gone", "added"}), frozenset({"$.b.c[*]"})) == [
        "$.a: 1 != 2"
    ]
    assert json_diff({"x": True}, {"x": 1}, frozenset(), frozenset()) == ["$.x: true != 1"]
    many = json_diff(list(range(50)), list(range(1, 51)), frozenset(), frozenset())
    assert len(many) == 10
    assert generic_path("$.items[12].tags[0].id") == "$.items[*].tags[*].id"


def test_ignore_paths_keep_their_index() -> None:
    keys, paths = split_ignores(["ts", "$.items[0].etag", "$.rows[*].id"])
    assert keys == {"ts"}
    legacy = {"ts": 1, "items": [{"etag": "a"}, {"etag": "b"}], "rows": [{"id": 1}, {"id": 2}]}
    new = {"ts": 2, "items": [{"etag": "x"}, {"etag": "y"}], "rows": [{"id": 3}, {"id": 4}]}
    # [0] ignores the first item's etag only; [*] every row's id.
    assert json_diff(legacy, new, keys, paths) == ['$.items[1].etag: "b" != "y"']


def test_body_differences_json_bytes_and_equal() -> None:
    def digest(data: bytes, limit: int = 1000) -> BodyDigest:
        d = BodyDigest(limit)
        d.feed(data)
        return d

    nothing: frozenset[str] = frozenset()
    assert body_differences(digest(b'{"a":1}'), digest(b'{ "a": 1 }'), nothing, nothing) == []
    assert body_differences(digest(b"abc"), digest(b"abd"), nothing, nothing) == [
        "bytes differ from offset 2 (legacy 3 B, new 3 B)"
    ]
    big = body_differences(digest(b"a" * 20, 10), digest(b"a" * 21, 10), nothing, nothing)
    assert "compared by hash" in big[0]
    # Nested past any recursion limit: compared as bytes, no crash.
    deep = b"[" * 100_000 + b"]" * 100_000
    other = b"[" * 100_000 + b"1" + b"]" * 100_000
    lines = body_differences(digest(deep, 300_000), digest(other, 300_000), nothing, nothing)
    assert lines == ["bytes differ from offset 100000 (legacy 200000 B, new 200001 B)"]
    deep_a = b"[" * 900 + b"1" + b"]" * 900
    deep_b = b"[" * 900 + b"2" + b"]" * 900
    assert len(body_differences(digest(deep_a), digest(deep_b, 5000), nothing, nothing)) == 1


def test_noise_learning() -> None:
    def answer(status: int, headers: dict[str, str], body: bytes) -> Answer:
        digest = BodyDigest(1000)
        digest.feed(body)
        return Answer(status, headers, digest, 0.01)

    noise = Noise()
    nothing: frozenset[str] = frozenset()
    first = answer(200, {"etag": "1", "content-type": "j"}, b'{"t": 1, "items": [{"id": 1}]}')
    second = answer(200, {"etag": "2", "content-type": "j"}, b'{"t": 2, "items": [{"id": 2}]}')
    assert noise.learn(first, second, nothing, nothing)
    assert noise.headers == {"etag"} and noise.json_paths == {"$.t", "$.items[*].id"}
    # A key with ": " in it is learned whole (paths are not parsed back out of diff text).
    assert noise.learn(answer(200, {}, b'{"at: x": 1}'), answer(200, {}, b'{"at: x": 2}'),
                       nothing, nothing)  # fmt: skip
    assert "$.at: x" in noise.json_paths
    assert not noise.learn(answer(200, {}, b"x"), answer(500, {}, b"x"), nothing, nothing)
    assert not noise.learn(answer(200, {}, b"a"), answer(200, {}, b"b"), nothing, nothing)


def test_shadow_pending_gauge_is_the_shadowers_not_a_pools() -> None:
    metrics = Metrics()
    metrics.shadow_pending = lambda: (3, 2)
    metrics.pool_sizes = lambda: [("legacy", 1, 7), ("new", 0, 5)]
    gauges = {tuple(k): v for k, v in metrics.snapshot()["gauges"]["router_shadow_pending"]}
    assert gauges == {("active",): 3, ("queued",): 2}


def test_merge_views_sums_and_recomputes() -> None:
    def view(matched: int, mismatched: int, at: float, noise: list[str]) -> dict[str, Any]:
        return {
            "tenants": {
                "acme": {
                    "shadowed": matched + mismatched,
                    "compared": matched + mismatched,
                    "matched": matched,
                    "mismatched": mismatched,
                    "noisy": 0,
                    "incomplete": 0,
                    "dropped": 1,
                    "mismatch_kinds": {"status": mismatched, "header": 0, "body": 0, "error": 0},
                    "match_rate": None,
                    "noise": {"headers": [], "json_paths": noise},
                    "first_at": at,
                    "last_at": at + 1,
                }
            },
            "recent": [{"at": at, "tenant": "acme"}],
        }

    merged = merge_views([view(9, 1, 10.0, ["$.a"]), view(90, 0, 5.0, ["$.b"])], limit=1)
    acme = merged["tenants"]["acme"]
    assert (acme["compared"], acme["matched"], acme["dropped"]) == (100, 99, 2)
    assert acme["match_rate"] == 0.99
    assert acme["mismatch_kinds"]["status"] == 1
    assert acme["noise"]["json_paths"] == ["$.a", "$.b"]
    assert (acme["first_at"], acme["last_at"]) == (5.0, 11.0)
    assert merged["recent"] == [{"at": 10.0, "tenant": "acme"}]
