"""router/cli/common.py: what every command shares, without running one."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import pytest

from router.cli.common import (
    EXIT_USAGE,
    UsageError,
    admin_urls,
    check_tenant_id,
    config_tree,
    count,
    fraction,
    marks,
    reporting_usage_errors,
    tenant_max_length,
)


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        (None, 128),
        ({}, 128),
        ({"tenant": {}}, 128),
        ({"tenant": {"max_length": 1024}}, 1024),
        ({"tenant": {"max_length": 1}}, 1),
    ],
)
def test_tenant_max_length_is_the_configs(tree: dict[str, Any] | None, expected: int) -> None:
    assert tenant_max_length(tree) == expected


@pytest.mark.parametrize("value", [0, 1025, "64", True, None, 12.5])
def test_a_max_length_the_router_would_refuse_is_a_usage_error(value: object) -> None:
    # The router would not start with it: the tools must not guess another bound.
    with pytest.raises(UsageError, match=r"tenant\.max_length must be an integer from 1 to 1024"):
        tenant_max_length({"tenant": {"max_length": value}})


def test_check_tenant_id_uses_the_bound_it_is_given() -> None:
    assert check_tenant_id("x" * 200, 1024) == "x" * 200
    with pytest.raises(UsageError, match=r"is not a valid tenant id \(1 to 128 characters"):
        check_tenant_id("x" * 200)


def test_config_tree_reads_the_named_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("tenant: {max_length: 512}\n")
    assert config_tree(argparse.Namespace(config=path)) == {"tenant": {"max_length": 512}}
    with pytest.raises(UsageError, match="cannot read the config"):
        config_tree(argparse.Namespace(config=tmp_path / "missing.yaml"))


def test_admin_urls_are_checked_and_deduplicated() -> None:
    urls = ["http://a:8081", "http://a:8081/", "https://b:8081"]
    assert admin_urls(urls) == ["http://a:8081", "https://b:8081"]
    for bad in ("a:8081", "http://a:8081/admin"):
        with pytest.raises(UsageError, match="--admin"):
            admin_urls([bad])


def test_argument_types() -> None:
    assert count("3") == 3
    assert fraction("0.999") == 0.999
    for parse, text in ((count, "0"), (count, "x"), (fraction, "0"), (fraction, "1.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_usage_errors_exit_2_with_the_commands_name(capsys: pytest.CaptureFixture[str]) -> None:
    class WriterError(Exception):
        pass

    def refuse(error: Exception) -> Any:
        def command(args: argparse.Namespace) -> int:
            raise error

        return command

    namespace = argparse.Namespace()
    assert reporting_usage_errors("cutover", refuse(UsageError("no")))(namespace) == EXIT_USAGE
    assert capsys.readouterr().err == "router cutover: no\n"
    wrapped = reporting_usage_errors("cutover", refuse(WriterError("bad")), WriterError)
    assert wrapped(namespace) == EXIT_USAGE
    assert capsys.readouterr().err == "router cutover: bad\n"
    with pytest.raises(ValueError):  # anything else is not a usage error
        reporting_usage_errors("cutover", refuse(ValueError("bug")))(namespace)


def test_marks_fall_back_to_words_where_the_stream_cannot_encode_them() -> None:
    assert marks(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")) == ("✓", "✗")
    assert marks(io.TextIOWrapper(io.BytesIO(), encoding="ascii")) == ("OK", "FAIL")
