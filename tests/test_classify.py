"""The crash-log classifier against real-shaped logs in tests/data/logs."""

from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path

import pytest

from pytest_metaloom.tools.classify import (
    FAULT_KIND_NAMES,
    KINDS,
    UnreadableLogError,
    classify_file,
    classify_stderr_tail,
    classify_text,
    clean_line,
)

LOGS = Path(__file__).parent / "data" / "logs"
ABORT_PREFIX = "libc++abi: terminating due to uncaught exception of type std::runtime_error:"
OOM_TEXT = (
    "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
)


@pytest.mark.parametrize(
    ("name", "kind", "semantics", "outcome", "exit_code", "line_number", "is_oom"),
    [
        ("seed_abort_split.log", "cmdbuf_oom", "abort", "aborted", -6, 4, True),
        ("journald_abort.log", "cmdbuf_oom", "abort", "aborted", -6, 3, True),
        ("resource_limit_traceback.log", "resource_limit", "sync", None, None, 6, True),
        ("deferred_cmdbuf_crlf.log", "cmdbuf_oom", "deferred", None, None, 6, True),
        ("wedge_generation_thread_died.log", "unable_to_allocate", "sync", "wedged", None, 2, True),
        ("llamacpp_status5.log", "cmdbuf_oom", None, None, None, 3, True),
        ("segfault_cpu.log", "segfault", None, "aborted", 139, 3, False),
        ("oom_killer.log", "killed", None, "aborted", -9, 3, True),
        ("clean.log", "none", None, None, 0, None, False),
    ],
)
def test_sample_logs(
    name: str,
    kind: str,
    semantics: str | None,
    outcome: str | None,
    exit_code: int | None,
    line_number: int | None,
    is_oom: bool,
) -> None:
    result = classify_file(LOGS / name)
    assert result.kind == kind
    assert result.semantics == semantics
    assert result.outcome == outcome
    assert result.exit_code == exit_code
    assert result.line_number == line_number
    assert result.is_oom is is_oom
    assert result.advice


def test_seed_excerpt_is_rejoined_without_prefixes() -> None:
    result = classify_file(LOGS / "seed_abort_split.log")
    assert result.decisive_line == (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: " + OOM_TEXT
    )
    assert result.signal == "SIGABRT"
    assert "iogpu.wired_limit_mb" in result.advice and "metaloom-guard" in result.advice


def test_llamacpp_pair_takes_detail_from_following_line() -> None:
    result = classify_file(LOGS / "llamacpp_status5.log")
    assert "failed with status 5" in (result.decisive_line or "")
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in (result.decisive_line or "")
    timeout = classify_text(
        "ggml_metal_graph_compute: command buffer 1 failed with status 5\n"
        "error: Caused GPU Timeout Error (00000002:kIOGPUCommandBufferCallbackErrorTimeout)\n"
    )
    assert timeout.kind == "gpu_timeout" and not timeout.is_oom


def test_binary_file_is_unreadable() -> None:
    with pytest.raises(UnreadableLogError, match="binary"):
        classify_file(LOGS / "binary.log")


def test_resource_limit_advice_names_a_leak() -> None:
    assert "leak" in classify_file(LOGS / "resource_limit_traceback.log").advice
    assert "wedged" in classify_file(LOGS / "wedge_generation_thread_died.log").advice


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("00000002:kIOGPUCommandBufferCallbackErrorTimeout", "gpu_timeout"),
        ("00000003:kIOGPUCommandBufferCallbackErrorHang", "gpu_hang"),
        ("00000005:kIOGPUCommandBufferCallbackErrorInnocentVictim", "gpu_victim"),
        ("00000009:kIOGPUCommandBufferCallbackErrorInvalidResource", "invalid_resource"),
    ],
)
def test_command_buffer_siblings_abort(code: str, kind: str) -> None:
    text = (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        f"[METAL] Command buffer execution failed: Some Error ({code})\n"
        "worker exited (rc=-6)\n"
    )
    result = classify_text(text)
    assert (result.kind, result.semantics, result.outcome) == (kind, "abort", "aborted")
    assert result.is_oom is False


def test_allocation_too_large_is_sync() -> None:
    result = classify_text(
        "RuntimeError: [metal::malloc] Attempting to allocate 90000000000 bytes which is greater "
        "than the maximum allowed buffer size of 77309411328 bytes.\n"
    )
    assert (result.kind, result.semantics) == ("alloc_too_large", "sync")


def test_last_abort_wins_over_earlier_deferred_errors() -> None:
    text = "\n".join(
        [
            f"RuntimeError: {OOM_TEXT}.",
            "RuntimeError: [malloc] Unable to allocate 1024 bytes.",
            "libc++abi: terminating due to uncaught exception of type std::runtime_error:",
            "[METAL] Command buffer execution failed: Caused GPU Hang Error",
            "(00000003:kIOGPUCommandBufferCallbackErrorHang)",
            "server exited with code 134",
        ]
    )
    result = classify_text(text)
    assert (result.kind, result.semantics, result.line_number) == ("gpu_hang", "abort", 3)
    assert (result.exit_code, result.signal) == (134, "SIGABRT")


def test_most_severe_wins_without_a_process_end() -> None:
    text = f"RuntimeError: {OOM_TEXT}.\nRuntimeError: [malloc] Unable to allocate 64 bytes.\n"
    assert classify_text(text).kind == "cmdbuf_oom"


def test_wedge_takes_kind_from_its_traceback() -> None:
    text = "\n".join(
        [
            "2025-11-25 11:21:09,774 - ERROR - mlx_lm.server generation thread died: boom",
            "Traceback (most recent call last):",
            '  File "server.py", line 544, in _run_generate',
            f"RuntimeError: {OOM_TEXT}.",
        ]
    )
    result = classify_text(text)
    assert (result.kind, result.semantics, result.outcome) == ("cmdbuf_oom", "deferred", "wedged")
    assert result.line_number == 1


def test_exit_code_alone_is_classified() -> None:
    assert classify_text("worker returncode -11\n").kind == "segfault"
    killed = classify_text("bash: line 1: 4242 Killed  python -m mlx_lm server\n")
    assert (killed.kind, killed.exit_code, killed.is_oom) == ("killed", -9, False)
    aborted = classify_text("mlx_lm.server exited (rc=-6)\n")
    assert (aborted.kind, aborted.semantics, aborted.outcome) == (
        "runtime_error",
        "abort",
        "aborted",
    )


def test_clean_line_strips_prefixes_and_colours() -> None:
    journald = "Nov 25 20:19:46 host mlx_lm.server[123]: "
    raw = journald + "\x1b[1;31m2025-11-25 20:19:46,001 - ERROR - x\x1b[0m\r\n"
    assert clean_line(raw) == "x"
    assert clean_line("20:19:46  INFO - Prompt Cache: 1 sequences") == "Prompt Cache: 1 sequences"


def test_unrelated_words_are_not_crashes() -> None:
    text = "Killed 3 stale sessions\nstatus: 5 requests queued\nrc file loaded\n"
    assert classify_text(text).kind == "none"


def test_stderr_tail_drops_a_cut_first_line() -> None:
    head = "x" * 100 + "[malloc] Unable to allocate 1 bytes.\n"
    tail = (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: " + OOM_TEXT
    )
    text = head + "filler\n" * 10 + tail + "\n"
    result = classify_stderr_tail(text, max_chars=len(text) - 50)
    assert result.kind == "cmdbuf_oom" and result.semantics == "abort"
    only_cut = classify_stderr_tail(head + "ok\n", max_chars=len("bytes.\nok\n") + 3)
    assert only_cut.kind == "none"


def test_large_log_is_streamed(tmp_path: Path) -> None:
    """An 8 MB log is classified with a small, size-independent memory peak."""
    log = tmp_path / "big.log"
    filler = "2025-11-25 10:00:00,000 - INFO - Prompt processing progress: 2048/65536 " + "." * 40
    with open(log, "w") as handle:
        for _ in range(75_000):
            handle.write(filler + "\n")
        handle.write(
            "libc++abi: terminating due to uncaught exception of type std::runtime_error:\n"
        )
        handle.write(OOM_TEXT + "\n")
    size = log.stat().st_size
    assert size > 8_000_000
    tracemalloc.start()
    try:
        result = classify_file(log)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.kind == "cmdbuf_oom" and result.line_number == 75_001
    assert peak < size / 20


def test_kinds_match_the_injector() -> None:
    assert set(FAULT_KIND_NAMES) < set(KINDS)
    if importlib.util.find_spec("pytest_metaloom.inject.faults") is None:
        pytest.skip("pytest_metaloom.inject.faults not written yet; kinds are spelled locally")
    from pytest_metaloom.inject import faults

    assert set(FAULT_KIND_NAMES) == set(faults.FAULT_KINDS)
