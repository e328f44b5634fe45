"""What to do about each failure kind the crash-log classifier names.

Operators read this text (``metaloom classify``, ``metaloom-guard``'s cause lines), so each
entry says what happened in plain terms and the one or two things that help.
"""

from __future__ import annotations

from pytest_metaloom.tools.classify_words import CMDBUF_KINDS

WEDGE_ADVICE = (
    "The generation thread died: the process is alive but wedged (404 to every request, /health "
    "503) until restarted. "
)
_WIRED = "raise `iogpu.wired_limit_mb` (sudo sysctl iogpu.wired_limit_mb=N)"
_WIRED_CAP = "R" + _WIRED[1:]
_ADVICE = {
    ("cmdbuf_oom", "abort"): (
        "The GPU ran out of wired memory and MLX < 0.32 aborts from a Metal thread; no Python "
        f"handler can catch it. {_WIRED_CAP}, size the prompt cache with `metaloom "
        "budget`, and run the server behind `metaloom-guard` so an abort costs a retry, not the "
        "request."
    ),
    ("cmdbuf_oom", None): (
        "The GPU ran out of wired memory (command-buffer OOM): model + prompt cache + active KV "
        f"crossed the wired ceiling. {_WIRED_CAP} or shrink the cache; check the numbers "
        "with `metaloom budget`."
    ),
    ("cmdbuf_oom", "deferred"): (
        "A command-buffer OOM was raised at the next sync point (mlx >= 0.32) and can be caught: "
        "the server should answer 503 and reset its prompt cache. To stop it happening, "
        f"{_WIRED} or lower --prompt-cache-bytes (see `metaloom budget`)."
    ),
    "alloc_too_large": (
        "One buffer was larger than Metal's maximum buffer size; more memory will not help. "
        "Lower --prefill-step-size, the batch size or the context length."
    ),
    "resource_limit": (
        "The count of live Metal buffers hit its limit (a number of buffers, not bytes): this is "
        "almost always a buffer leak. Look for arrays kept alive across requests; "
        "mx.clear_cache() will not free them."
    ),
    "unable_to_allocate": (
        "The allocator could not get memory: a synchronous, catchable OOM. Answer 503 and reset "
        "the prompt cache; lower --prompt-cache-bytes or the context to stop it recurring."
    ),
    "gpu_timeout": (
        "A command buffer ran past the GPU watchdog (not a memory error). Use smaller prefill "
        "steps or shorter prompts; on mlx < 0.32 this aborts like the OOM, so use `metaloom-guard`."
    ),
    "gpu_hang": (
        "The GPU reported a hang and was reset (not a memory error). Retry on a fresh process; "
        "run behind `metaloom-guard` so the restart is automatic."
    ),
    "gpu_victim": (
        "This command buffer was discarded because another GPU client faulted; the cause is in "
        "another process's log. Retry the request."
    ),
    "invalid_resource": (
        "A command buffer used a freed or invalid buffer: an MLX or kernel bug, not memory "
        "pressure. Report it upstream with the log; retry on a fresh process."
    ),
    "gpu_error": (
        "A Metal command buffer failed (the GPU refused or lost the work) with a code that is "
        "not a memory error, or with no code in the log. The graceful answer is 503; after "
        "repeated GPU errors macOS ignores the process's submissions until it restarts, so run "
        "behind `metaloom-guard`. Look for the first GPU error earlier in the log."
    ),
    "runtime_error": (
        "A non-OOM failure ended or broke the server; the correct answer to the client is 500, "
        "not 503. Read the traceback around the decisive line."
    ),
    "hang": "Evaluation blocked without an error: restart the server and report the hang.",
    "segfault": (
        "The process crashed with SIGSEGV. On the CPU backend this is often how an allocation "
        "failure ends (no MLX error is raised); otherwise report it upstream with the log."
    ),
    "killed": (
        "The process was killed with SIGKILL, typically by the kernel's OOM killer (or jetsam on "
        "macOS): system RAM ran out. Lower the prompt cache or model size, or add memory."
    ),
    "kernel_panic": (
        "macOS panicked in the GPU driver (IOGPU) and rebooted: no process can survive or catch "
        "this. It is reported under sustained GPU memory churn; keep wired memory well under "
        "the ceiling (`metaloom budget`), update macOS, and report the panic to Apple."
    ),
    "none": "No MLX failure, crash or kill found in this log.",
}


def advice(kind: str, semantics: str | None) -> str:
    if kind in CMDBUF_KINDS and kind != "cmdbuf_oom":
        return _ADVICE[kind]  # type: ignore[return-value]
    if kind == "cmdbuf_oom":
        return _ADVICE[("cmdbuf_oom", semantics if semantics in ("abort", "deferred") else None)]
    return _ADVICE.get(kind, _ADVICE["runtime_error"])  # type: ignore[return-value]
