"""The crash-log classifier against real-shaped logs in tests/data/logs."""

from __future__ import annotations

import importlib.util
import itertools
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from pytest_metaloom.tools.classify import (
    FAULT_KIND_NAMES,
    KINDS,
    Classification,
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
        pytest.skip("pytest_metaloom.faults not written yet; kinds are spelled locally")
    from pytest_metaloom.inject import faults

    assert set(FAULT_KIND_NAMES) == set(faults.FAULT_KINDS)


# --- the public corpus: real logs from public issue threads ---------------------------------

PUBLIC = LOGS / "public"
MEASURED = LOGS / "measured"
RECALL_FLOOR = 0.95
CLASSIFY_DOC = Path(__file__).parents[1] / "docs" / "reference" / "classify.md"


def _manifest(folder: Path) -> list[dict[str, Any]]:
    with open(folder / "manifest.toml", "rb") as handle:
        return list(tomllib.load(handle)["log"])


def _verdict(entry: dict[str, Any], folder: Path) -> tuple[bool, str]:
    """(right?, what differed) for one manifest entry: kind, the facts it names, confidence."""
    result = classify_file(folder / f"{entry['id']}.log")
    expect = entry["expect"]
    wrong = []
    if result.kind != expect["kind"]:
        wrong.append(f"kind {result.kind} (want {expect['kind']})")
    for field in ("semantics", "outcome"):
        if field in expect and getattr(result, field) != expect[field]:
            wrong.append(f"{field} {getattr(result, field)} (want {expect[field]})")
    if "oom" in expect and result.is_oom is not expect["oom"]:
        wrong.append(f"is_oom {result.is_oom} (want {expect['oom']})")
    if result.confidence != entry["confidence"]:
        wrong.append(f"confidence {result.confidence} (want {entry['confidence']})")
    return not wrong, ", ".join(wrong)


def test_public_corpus_is_well_formed() -> None:
    entries = _manifest(PUBLIC)
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids)), "duplicate ids in the manifest"
    on_disk = {p.stem for p in PUBLIC.glob("*.log")}
    assert on_disk == set(ids), f"logs and manifest entries differ: {on_disk ^ set(ids)}"
    failures = [e for e in entries if e["expect"]["kind"] != "none"]
    assert len(failures) >= 60
    for entry in entries:
        assert entry["source"].startswith("https://github.com/"), entry["id"]
        assert re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", entry["date"]), entry["id"]
        assert entry["expect"]["kind"] in KINDS, entry["id"]
        assert entry["fault"] in KINDS or entry["fault"] == "unknown", entry["id"]
        assert entry["confidence"] in ("high", "low"), entry["id"]
        assert len(entry["established"]) > 40, entry["id"]
        assert (PUBLIC / f"{entry['id']}.log").stat().st_size > 0


def test_public_corpus_recall_on_high_confidence_logs() -> None:
    """At least 95% of the logs whose text settles the kind are classified right."""
    high = [e for e in _manifest(PUBLIC) if e["confidence"] == "high"]
    misses = {e["id"]: why for e in high for ok, why in [_verdict(e, PUBLIC)] if not ok}
    recall = 1 - len(misses) / len(high)
    assert recall >= RECALL_FLOOR, f"recall {recall:.1%} on {len(high)} logs; misses: {misses}"


def test_public_corpus_low_confidence_logs_say_so() -> None:
    """Where the log alone cannot tell, the classifier says low rather than guessing."""
    low = [e for e in _manifest(PUBLIC) if e["confidence"] == "low"]
    assert len(low) >= 5
    for entry in low:
        result = classify_file(PUBLIC / f"{entry['id']}.log")
        assert result.confidence == "low", entry["id"]
        assert result.confidence_note, entry["id"]


def test_measured_logs() -> None:
    for entry in _manifest(MEASURED):
        ok, why = _verdict(entry, MEASURED)
        assert ok, f"{entry['id']}: {why}"


def test_classify_doc_states_the_corpus_size() -> None:
    """The docs page's numbers are the corpus's, not a stale copy."""
    entries = _manifest(PUBLIC)
    high = sum(e["confidence"] == "high" for e in entries)
    low = len(entries) - high
    right_high = sum(_verdict(e, PUBLIC)[0] for e in entries if e["confidence"] == "high")
    right_low = sum(_verdict(e, PUBLIC)[0] for e in entries if e["confidence"] == "low")
    heldout = [e["id"] for e in entries if e.get("heldout")]
    text = CLASSIFY_DOC.read_text()
    assert f"{len(entries)} public logs" in text
    # the score table's rows are recomputed here, so the page cannot keep a stale score
    assert f"| {high} high-confidence logs | {high} | **{right_high} (" in text
    low_row = f"| {low} low-confidence logs (the classifier must say `low`) | {low} | {right_low} |"
    assert low_row in text
    assert f"{len(heldout)} more logs were collected" in text, heldout


def _public(name: str) -> Classification:
    return classify_file(PUBLIC / f"{name}.log")


def test_apple_iogpu_wording_without_mlx_prefix() -> None:
    """macOS's unified-log wording ("IOGPUMetalError" / "Execution of the command buffer...")."""
    result = _public("mlx-serve-321-iogpu-unified-log")
    assert (result.kind, result.confidence, result.is_oom) == ("cmdbuf_oom", "high", True)
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in (result.decisive_line or "")


def test_llamacpp_synchronize_status5_with_detail() -> None:
    result = _public("llamacpp-22673-synchronize-status5")
    assert (result.kind, result.confidence) == ("cmdbuf_oom", "high")
    bare = _public("jan-8206-bare-status5")
    assert (bare.kind, bare.confidence, bare.is_oom) == ("gpu_error", "low", False)
    assert "error code" in (bare.confidence_note or "")


def test_status5_detail_comes_from_the_code_not_the_prefix() -> None:
    old_macos = _public("llamacpp-8886-submissions-ignored")
    assert (old_macos.kind, old_macos.confidence) == ("gpu_error", "high")
    preemption = _public("omlx-1387-impacting-interactivity")
    assert (preemption.kind, preemption.semantics) == ("gpu_timeout", "abort")
    fault = _public("mlx-vlm-1064-page-fault")
    assert fault.kind == "invalid_resource" and not fault.is_oom


def test_malloc_or_wait_is_unable_to_allocate() -> None:
    result = _public("mlx-63-malloc-or-wait-zsh-abort")
    assert (result.kind, result.semantics, result.outcome) == (
        "unable_to_allocate",
        "abort",
        "aborted",
    )
    assert (result.exit_code, result.signal) == (-6, "SIGABRT")
    glued = _public("mlx-examples-21-malloc-or-wait-tqdm")
    assert glued.kind == "unable_to_allocate" and glued.is_oom


@pytest.mark.parametrize(
    ("name", "kind", "signal"),
    [
        ("mlx-lm-64-zsh-segfault", "segfault", "SIGSEGV"),
        ("mlx-341-tqdm-zsh-segfault", "segfault", "SIGSEGV"),
        ("mlx-examples-1334-zsh-killed", "killed", "SIGKILL"),
        ("mlx-lm-854-job-abort", "cmdbuf_oom", "SIGABRT"),
        ("llamacpp-7652-assert-job-abort", "runtime_error", "SIGABRT"),
        ("llamaedge-7-ggml-assert-abort-trap", "runtime_error", "SIGABRT"),
        ("mlx-openai-server-169-victim-abort-trap", "gpu_victim", "SIGABRT"),
    ],
)
def test_shell_death_reports(name: str, kind: str, signal: str) -> None:
    """zsh's "segmentation fault"/"killed", job-table "[1] 68916 abort", bash's "Abort trap: 6"."""
    result = _public(name)
    assert (result.kind, result.outcome, result.signal) == (kind, "aborted", signal)


@pytest.mark.parametrize(
    ("name", "kind", "is_oom"),
    [
        ("ollama-11231-systemd-oom-kill", "killed", True),
        ("ollama-6525-systemd-exit-failure", "runtime_error", False),
        ("omlx-2184-launchd-sigkill-after-sigterm", "killed", False),
        ("ollama-9685-runner-signal-killed", "killed", False),
        ("ollama-5970-runner-aborted-core-dumped", "runtime_error", False),
        ("omlx-2029-timeout-exit6", "gpu_timeout", False),
        ("vllm-metal-274-engine-core-died", "cmdbuf_oom", True),
    ],
)
def test_supervisor_death_reports(name: str, kind: str, is_oom: bool) -> None:
    """systemd/journald, launchd, Ollama's runner supervisor, oMLX's and vLLM's supervisors."""
    result = _public(name)
    assert (result.kind, result.outcome, result.is_oom) == (kind, "aborted", is_oom)


def test_non_oom_failure_in_generation_thread_is_a_runtime_error() -> None:
    """The generation thread dies of a TypeError: a non-OOM runtime error (answer 500)."""
    died = _public("mlx-lm-1472-generation-thread-typeerror")
    assert (died.kind, died.outcome, died.is_oom) == ("runtime_error", "wedged", False)
    assert died.confidence == "low"  # the excerpt ends before the exception line
    typeerror = _public("vllm-mlx-592-engine-loop-typeerror")
    assert (typeerror.kind, typeerror.confidence) == ("runtime_error", "high")
    assert not typeerror.is_oom
    assert "500" in typeerror.advice
    stream = _public("mlx-lm-1181-no-stream-in-thread")
    assert (stream.kind, stream.outcome, stream.confidence) == ("runtime_error", "wedged", "high")
    oom = _public("mlx-lm-1493-resource-limit-step")
    assert (oom.kind, oom.outcome, oom.is_oom) == ("resource_limit", "wedged", True)


def test_cuda_allocator_texts() -> None:
    """MLX on NVIDIA: "cudaMallocAsync(&data, size, stream) failed: out of memory"."""
    measured = classify_file(MEASURED / "h200-cuda-generation-thread.log")
    assert (measured.kind, measured.semantics) == ("unable_to_allocate", "sync")
    assert measured.is_oom
    client = classify_file(MEASURED / "h200-cuda-graceful-oom-500.log")
    assert client.is_oom and client.kind == "unable_to_allocate"
    graph = classify_file(MEASURED / "h200-cuda-graph-instantiate.log")
    assert (graph.kind, graph.semantics, graph.confidence) == ("unable_to_allocate", "sync", "high")
    assert graph.is_oom  # any CUDA call that ends "failed: out of memory", not only cudaMalloc*
    illegal = classify_text(
        "RuntimeError: cudaGraphLaunch(exec, stream) failed: an illegal memory access was "
        "encountered\n"
    )
    assert not illegal.is_oom  # a CUDA call's other failures say nothing of memory
    sticky = _public("mlx-2821-cuda-managed-terminate")
    assert (sticky.kind, sticky.semantics) == ("unable_to_allocate", "abort")
    assert sticky.confidence == "low"


def test_kernel_panic_is_named() -> None:
    result = _public("vmlx-11-panic-panicked-task")
    assert (result.kind, result.is_oom) == ("kernel_panic", False)
    assert "IOGPU" in result.advice


def test_handled_client_disconnect_is_not_a_failure() -> None:
    assert _public("metrics-server-exporter-40-broken-pipe").kind == "none"


def test_confidence_reaches_the_json() -> None:
    data = _public("omlx-354-crash-report-check-error").to_dict()
    assert (data["kind"], data["confidence"]) == ("gpu_error", "low")
    assert data["confidence_note"]


def test_generation_thread_traceback_with_its_exception_is_high_confidence() -> None:
    """mlx-lm-1472's traceback, completed with the line the thread reports, names the error."""
    head = (PUBLIC / "mlx-lm-1472-generation-thread-typeerror.log").read_text()
    result = classify_text(head + "TypeError: 'NoneType' object is not iterable\n")
    assert (result.kind, result.outcome, result.confidence) == ("runtime_error", "wedged", "high")
    assert result.line_number == 1 and not result.is_oom


def test_ordinary_lines_with_alarming_words_are_not_failures() -> None:
    text = (
        "Error rendering prompt with jinja template: roles must alternate\n"
        "memory: 12.5 GB free of 64 GB; status 5 requests queued\n"
        "killed 2 idle sessions; abort requested by client\n"
        '127.0.0.1 - - "POST /v1/chat/completions HTTP/1.1" 500 -\n'
    )
    assert classify_text(text).kind == "none"


def test_word_tables_name_only_known_kinds() -> None:
    """The wording tables spell kinds; every one they can produce is a known kind."""
    from pytest_metaloom.tools import classify_words as words

    produced = set(words.CODE_KINDS.values()) | set(words.NUMBER_KINDS.values())
    produced |= {kind for _, kind in words.DETAIL_WORDS} | set(words.LOW_NOTES)
    produced |= words.OOM_KINDS | words.CMDBUF_KINDS
    assert produced <= set(KINDS)


@pytest.mark.parametrize("kind", [k for k in FAULT_KIND_NAMES if k != "hang"])
def test_the_injectors_texts_are_classified_as_their_kinds(kind: str) -> None:
    """What the injector raises (as Python sees it, and as an abort) is named as its kind."""
    from pytest_metaloom.inject import faults

    fault = faults.FAULT_KINDS[kind]
    # every backend's text for the kind: Metal's, and CUDA's where the injector has them
    variants = list(getattr(fault, "variants", None) or [None])
    for variant, semantics in itertools.product(variants, fault.allowed_semantics):
        options = {"variant": variant} if variant else {}
        text = faults.message(kind, semantics, **options)
        line = faults.abort_line(text) if semantics == "abort" else f"RuntimeError: {text}"
        result = classify_text(line + "\n")
        assert (result.kind, result.confidence) == (kind, "high"), (semantics, line)
        assert result.is_oom is fault.is_oom
        if kind != "runtime_error":
            # a command-buffer error raised in Python reads the same whether the committing
            # evaluation or a later sync point raised it: the log says "deferred" for both
            raised = "deferred" if fault.family == "command_buffer" else semantics
            assert result.semantics == ("abort" if semantics == "abort" else raised), line


def test_a_non_oom_error_in_a_prediction_stream_is_a_runtime_error() -> None:
    """LM Studio's wording, with a non-memory exception (a Metal library that cannot build)."""
    result = classify_text(
        "Error in iterating prediction stream: RuntimeError: [metal::Device] Unable to build "
        "metal library from source\n"
    )
    assert (result.kind, result.confidence, result.is_oom) == ("runtime_error", "high", False)
