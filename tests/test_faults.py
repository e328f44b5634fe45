"""Fault kinds, exact texts, semantics, the spec grammar and sizes (pure, no server)."""

from __future__ import annotations

import pytest

from pytest_metaloom.inject.faults import (
    BACKEND_TEXTS,
    FAULT_KINDS,
    PATHS,
    SEMANTICS,
    SITES,
    VARIANTS,
    ChainState,
    FaultSpecError,
    abort_line,
    default_semantics,
    message,
    parse_size,
    parse_spec,
)

EXAMPLES = [
    "cmdbuf_oom",
    "1*cmdbuf_oom(abort)",
    "2*off->1*cmdbuf_oom(abort)->off",
    "1*resource_limit@site=decode,path=batched",
    "1*cmdbuf_oom(deferred)@wired=active+2MiB",
    "25%gpu_hang(deferred)@seed=7",
    "1*alloc_too_large(bytes=68719476736,max=34359738368)@request=abc",
    "1*hang@site=prefill|decode;1*runtime_error@nth_request=2,after_tokens=5",
    "1*unable_to_allocate(cuda)@site=cache,memory=allocated+1KiB",
    "1*cmdbuf_oom(sync)@path=sequential",
    "50%3*gpu_victim@memory=0.9*limit,after_evals=10,nth_eval=12",
]


def test_public_names() -> None:
    assert list(FAULT_KINDS) == [
        "alloc_too_large",
        "resource_limit",
        "unable_to_allocate",
        "cmdbuf_oom",
        "gpu_timeout",
        "gpu_hang",
        "gpu_victim",
        "invalid_resource",
        "runtime_error",
        "hang",
    ]
    assert SEMANTICS == ("abort", "deferred", "sync")
    assert SITES == ("prefill", "decode", "cache")
    assert PATHS == ("batched", "sequential")


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_parse_and_round_trip(text: str) -> None:
    spec = parse_spec(text)
    assert spec.to_text() == text
    assert parse_spec(spec.to_text()) == spec


def test_parsed_structure() -> None:
    point = parse_spec("2*off->1*cmdbuf_oom(abort)->off").points[0]
    assert [(t.action, t.count, t.semantics) for t in point.terms] == [
        ("off", 2, None),
        ("cmdbuf_oom", 1, "abort"),
        ("off", None, None),
    ]
    point = parse_spec("1*resource_limit@site=decode|cache,path=batched").points[0]
    assert point.sites == ("decode", "cache") and point.get("path") == "batched"
    term = parse_spec("1*alloc_too_large(bytes=10,max=5)").points[0].terms[0]
    assert dict(term.params) == {"bytes": 10, "max": 5}
    assert parse_spec(" 1*cmdbuf_oom ( abort ) ").to_text() == "1*cmdbuf_oom(abort)"


@pytest.mark.parametrize(
    ("text", "needle", "caret_at"),
    [
        ("1*cmdbuf_om(abort)", "unknown fault kind 'cmdbuf_om'", 2),
        ("cmdbuf_oom@site=decod", "did you mean 'decode'?", 16),
        ("cmdbuf_oom@path=batch", "did you mean 'batched'?", 16),
        ("cmdbuf_oom@wird=1MB", "did you mean 'wired'?", 11),
        ("cmdbuf_oom(abrt)", "did you mean 'abort'?", 11),
        ("resource_limit(abort)", "does not fit 'resource_limit'", 15),
        ("runtime_error(deferred)", "does not fit 'runtime_error'", 14),
        ("hang(sync,deferred)", "semantics given twice", 10),
        ("resource_limit(cuda)", "has no 'cuda' variant", 15),
        ("unable_to_allocate(cuda,metal)", "variant given twice", 24),
        ("unable_to_allocate(cudda)", "did you mean 'cuda'?", 19),
        ("1*cmdbuf_oom@wired=12XB", "unknown size unit 'XB'", 19),
        ("1*cmdbuf_oom@wired=actve+1MB", "did you mean 'active'?", 19),
        ("cmdbuf_oom->off", "unreachable", 12),
        ("1*cmdbuf_oom;;hang", "empty fault point", 13),
        ("1*cmdbuf_oom(bytes=5)", "takes no parameter 'bytes'", 13),
        ("0*cmdbuf_oom", "at least 1", 0),
        ("1*cmdbuf_oom@site=decode,site=cache", "given twice", 25),
        ("1*cmdbuf_oom@nth_eval=0", "counts from 1", 22),
        ("1*cmdbuf_oom@seed=x", "whole number", 18),
        ("1**cmdbuf_oom", "malformed term", 0),
        ("", "empty", 0),
    ],
)
def test_errors_point_at_the_problem(text: str, needle: str, caret_at: int) -> None:
    with pytest.raises(FaultSpecError) as info:
        parse_spec(text)
    err = info.value
    assert needle in str(err)
    assert err.pos == caret_at
    lines = str(err).splitlines()
    assert lines[1] == f"  {text}"
    assert lines[2].startswith("  " + " " * caret_at + "^")
    assert isinstance(err, ValueError)


def test_suggestion_message_format() -> None:
    with pytest.raises(FaultSpecError) as info:
        parse_spec("1*cmdbuf_om(abort)")
    first = str(info.value).splitlines()[0]
    assert first.startswith("invalid fault spec: unknown fault kind 'cmdbuf_om'")
    assert first.endswith("did you mean 'cmdbuf_oom'?")
    assert str(info.value).splitlines()[2] == "    ^^^^^^^^^"


# ---------------------------------------------------------------------- texts

# Copied character for character from mlx-oom-facts.md section 1.
FACT_TEXTS = {
    "cmdbuf_oom": "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "gpu_timeout": "[METAL] Command buffer execution failed: Caused GPU Timeout Error "
    "(00000002:kIOGPUCommandBufferCallbackErrorTimeout)",
    "gpu_hang": "[METAL] Command buffer execution failed: Caused GPU Hang Error "
    "(00000003:kIOGPUCommandBufferCallbackErrorHang)",
    "gpu_victim": "[METAL] Command buffer execution failed: Discarded (victim of GPU "
    "error/recovery) (00000005:kIOGPUCommandBufferCallbackErrorInnocentVictim)",
    "invalid_resource": "[METAL] Command buffer execution failed: Invalid Resource "
    "(00000009:kIOGPUCommandBufferCallbackErrorInvalidResource)",
}


@pytest.mark.parametrize("kind", list(FACT_TEXTS))
def test_command_buffer_texts(kind: str) -> None:
    assert message(kind, "abort") == FACT_TEXTS[kind]
    assert message(kind, "deferred") == FACT_TEXTS[kind] + "."
    assert message(kind, "sync") == FACT_TEXTS[kind] + "."  # raised in Python: mlx >= 0.32
    assert abort_line(message(kind, "abort")) == (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        + FACT_TEXTS[kind]
    )


def test_allocator_texts() -> None:
    assert message("alloc_too_large", bytes=68719476736, max=34359738368) == (
        "[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than "
        "the maximum allowed buffer size of 34359738368 bytes."
    )
    assert message("resource_limit") == "[metal::malloc] Resource limit (499000) exceeded."
    assert message("resource_limit", limit=12) == "[metal::malloc] Resource limit (12) exceeded."
    assert message("unable_to_allocate", bytes=1024) == "[malloc] Unable to allocate 1024 bytes."
    with pytest.raises(ValueError, match="takes no parameter"):
        message("resource_limit", bytes=3)
    with pytest.raises(ValueError, match="does not fit"):
        message("alloc_too_large", "abort")


# MLX's CUDA allocator (mlx/backend/cuda/allocator.cpp, 0.31.0 to 0.32.4): CHECK_CUDA_ERROR
# throws "<call> failed: <cudaGetErrorString>"; the H200 run of mlx-oom-facts section 8 saw
# the first one, character for character.
CUDA_TEXTS = {
    "cuda": "cudaMallocAsync(&data, size, stream) failed: out of memory",
    "cuda_malloc": "cudaMalloc(&data, size) failed: out of memory",
    "cuda_managed": "cudaMallocManaged(&data, size) failed: out of memory",
    "cuda_host": "cudaMallocHost(&data, size) failed: out of memory",
}


@pytest.mark.parametrize("variant", list(CUDA_TEXTS))
def test_cuda_variants_carry_mlx_cuda_allocator_texts(variant: str) -> None:
    assert message("unable_to_allocate", variant=variant) == CUDA_TEXTS[variant]
    term = parse_spec(f"1*unable_to_allocate({variant})").points[0].terms[0]
    assert term.variant == variant and term.to_text() == f"1*unable_to_allocate({variant})"
    assert BACKEND_TEXTS["unable_to_allocate"][variant] == CUDA_TEXTS[variant]


def test_backend_texts_cover_every_gpu_kind_and_only_unable_to_allocate_has_cuda() -> None:
    gpu = {k.name for k in FAULT_KINDS.values() if k.family in ("allocator", "command_buffer")}
    assert set(BACKEND_TEXTS) == gpu
    for kind, texts in BACKEND_TEXTS.items():
        assert texts["metal"] and message(kind).startswith(texts["metal"])
        assert ("cuda" in texts) == (kind == "unable_to_allocate")
    assert set(VARIANTS) == set(BACKEND_TEXTS["unable_to_allocate"])
    with pytest.raises(ValueError, match="has no 'cuda' variant"):
        message("cmdbuf_oom", "deferred", "cuda")


def test_status_and_oom_classification() -> None:
    assert {k.name for k in FAULT_KINDS.values() if k.is_oom} == {
        "alloc_too_large",
        "resource_limit",
        "unable_to_allocate",
        "cmdbuf_oom",
    }
    assert {k.name for k in FAULT_KINDS.values() if k.expected_status == 500} == {"runtime_error"}
    assert all(k.expected_status in (500, 503) for k in FAULT_KINDS.values())
    fams = {k.name: k.family for k in FAULT_KINDS.values()}
    assert fams["hang"] == "hang" and fams["runtime_error"] == "control"
    assert fams["gpu_victim"] == "command_buffer" and fams["resource_limit"] == "allocator"


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.31.3", "abort"), ("0.29.0", "abort"), ("0.32.0", "deferred"), ("0.32.4", "deferred")],
)
def test_default_semantics(version: str, expected: str) -> None:
    assert default_semantics(version) == expected


def test_default_semantics_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="cannot read an MLX version"):
        default_semantics("dev")


def test_resolved_semantics_by_family() -> None:
    terms = parse_spec("1*cmdbuf_oom->1*resource_limit->1*gpu_hang(abort)").points[0].terms
    assert [t.resolved_semantics("deferred") for t in terms] == ["deferred", "sync", "abort"]


# ---------------------------------------------------------------------- sizes

BASE = {
    "active": 100 * 2**20,
    "allocated": 90 * 2**20,
    "peak": 200 * 2**20,
    "limit": 1000 * 2**20,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48MiB", 48 * 2**20),
        ("48MB", 48 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5KB", 1500),
        ("7", 7),
        ("7B", 7),
        ("1TiB", 2**40),
        ("0.9*limit", int(0.9 * BASE["limit"])),
        ("active+2MiB", BASE["active"] + 2 * 2**20),
        ("allocated+1KiB", BASE["allocated"] + 1024),
        ("peak-1MB", BASE["peak"] - 10**6),
        ("limit", BASE["limit"]),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text, BASE) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("12XB", "unknown size unit 'XB'"),
        ("lmit", "did you mean 'limit'?"),
        ("1MiB-active", "malformed size"),
        ("active-1TiB", "resolves to"),
        ("", "malformed size"),
    ],
)
def test_size_errors(text: str, needle: str) -> None:
    with pytest.raises(FaultSpecError, match=needle.replace("?", r"\?")):
        parse_size(text, BASE)


def test_size_needs_its_baseline() -> None:
    with pytest.raises(FaultSpecError, match="'peak' is not known here"):
        parse_size("peak", {"active": 1})


# ---------------------------------------------------------------------- chain state


def _fire_pattern(text: str, hits: int) -> list[str | None]:
    state = ChainState(parse_spec(text).points[0])
    out = []
    for _ in range(hits):
        term = state.hit()
        out.append(term.action if term else None)
    return out


def test_chain_off_then_once() -> None:
    assert _fire_pattern("2*off->1*cmdbuf_oom(abort)->off", 5) == [
        None,
        None,
        "cmdbuf_oom",
        None,
        None,
    ]
    assert _fire_pattern("2*cmdbuf_oom", 4) == ["cmdbuf_oom", "cmdbuf_oom", None, None]
    assert _fire_pattern("cmdbuf_oom", 3) == ["cmdbuf_oom"] * 3


def test_probability_is_deterministic_with_seed() -> None:
    a = _fire_pattern("25%gpu_hang(deferred)@seed=7", 400)
    b = _fire_pattern("25%gpu_hang(deferred)@seed=7", 400)
    c = _fire_pattern("25%gpu_hang(deferred)@seed=8", 400)
    assert a == b
    assert a != c
    rate = sum(x is not None for x in a) / len(a)
    assert 0.18 < rate < 0.32


def test_chain_counts_hits_and_fired() -> None:
    state = ChainState(parse_spec("1*off->2*resource_limit").points[0])
    for _ in range(5):
        state.hit()
    assert (state.hits, state.fired, state.exhausted) == (5, 2, True)
