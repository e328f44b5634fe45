"""One home for shared facts: every reader of sizes, limits and KV bytes agrees with units.py."""

from __future__ import annotations

import pytest

from pytest_metaloom import units
from pytest_metaloom.inject.faults import FaultSpecError, parse_spec
from pytest_metaloom.inject.faults import parse_size as fault_size
from pytest_metaloom.inject.injector import bootstrap_env
from pytest_metaloom.server import model
from pytest_metaloom.tools import budget

BASE = {"active": 1000, "peak": 2000, "limit": 10_000}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5G", 1_500_000_000),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("2k", 2000),
        ("4096", 4096),
        ("3 TiB", 3 * 2**40),
    ],
)
def test_every_size_reader_reads_the_same_bytes(text: str, expected: int) -> None:
    assert units.parse_size(text) == expected
    assert fault_size(text, BASE) == expected
    assert budget.parse_size(text) == expected
    parse_spec(f"1*resource_limit@wired={text.replace(' ', '')}")  # a filter accepts it too
    bootstrap_env_limits = f"wired={text},memory={text}"
    assert units.parse_limits(bootstrap_env_limits) == {"wired": text, "memory": text}


def test_relative_sizes_need_the_servers_counters() -> None:
    assert units.parse_size("0.5*limit", BASE) == 5000
    assert units.parse_size("active+1KB", BASE) == 2000
    units.check_size("peak-1GiB")  # form only: the counters are not known yet
    with pytest.raises(units.SizeError, match="only known inside the server"):
        units.parse_size("0.5*limit")
    with pytest.raises(budget.BudgetError, match="only known inside the server"):
        budget.parse_size("0.5*limit")
    with pytest.raises(units.SizeError, match="< 0"):
        units.parse_size("active-1MB", BASE)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("12XB", "unknown size unit 'XB'"),
        ("0.9*limt", "did you mean 'limit'"),
        ("lots", "unknown size base 'lots'"),
        ("", "malformed size"),
    ],
)
def test_bad_sizes_fail_the_same_way_everywhere(text: str, needle: str) -> None:
    with pytest.raises(units.SizeError, match=needle):
        units.parse_size(text, BASE)
    with pytest.raises(FaultSpecError, match=needle):
        fault_size(text, BASE)
    with pytest.raises(budget.BudgetError, match=needle):
        budget.parse_size(text)


def test_limits_text_is_read_in_one_place(tmp_path) -> None:
    assert units.parse_limits(" wired=0.8*limit , memory=16GiB ") == {
        "wired": "0.8*limit",
        "memory": "16GiB",
    }
    with pytest.raises(units.SizeError, match="did you mean 'wired'") as info:
        units.parse_limits("memory=1G,wird=2G")
    assert info.value.pos == len("memory=1G,")
    with pytest.raises(units.SizeError, match="given twice"):
        units.parse_limits("wired=1G,wired=2G")
    with pytest.raises(units.SizeError, match="unknown size unit 'Q'"):
        units.parse_limits("wired=3Q")
    # the harness refuses a bad limits text before any server starts, with the same words
    with pytest.raises(FaultSpecError, match="unknown size unit 'Q'"):
        bootstrap_env(tmp_path, limits="wired=3Q")
    assert bootstrap_env(tmp_path, limits="wired=1.5G")["METALOOM_LIMITS"] == "wired=1.5G"


LLAMA_8B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("kv_bits", [None, 2, 3, 4, 8])
def test_the_kv_formula_has_one_home(kv_bits: int | None) -> None:
    expected = units.kv_bytes_per_token(
        layers=32, kv_heads=8, head_dim=128, dtype_bytes=2, kv_bits=kv_bits
    )
    assert budget.kv_bytes_per_token(LLAMA_8B, kv_bits=kv_bits) == expected
    assert model.kv_bytes_per_token_from_config(LLAMA_8B, kv_bits=kv_bits) == expected
    if kv_bits is None:
        assert expected == 2 * 32 * 8 * 128 * 2


def test_dtype_widths_have_one_home() -> None:
    assert model.DTYPE_BYTES == {name: units.DTYPE_BYTES[name] for name in units.FLOAT_DTYPES}
    assert budget.DTYPE_BYTES is units.DTYPE_BYTES
