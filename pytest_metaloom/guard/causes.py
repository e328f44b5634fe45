"""Why did the worker die? Turn an exit status plus a stderr tail into a named cause.

The guard reports causes with the shared crash-log classifier
(``pytest_metaloom.tools.classify``) so the CLI, the harness and the guard agree on names.
If that module cannot be imported or fails, a small local fallback recognises the MLX texts
the guard cares about, so the guard never loses a cause.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_metaloom.server.process import signal_name

# Ordered: the first pattern that matches a line names the kind. Texts follow mlx-oom-facts.md §1.
_FALLBACK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("cmdbuf_oom", re.compile(r"kIOGPUCommandBufferCallbackErrorOutOfMemory")),
    ("gpu_timeout", re.compile(r"kIOGPUCommandBufferCallbackErrorTimeout")),
    ("gpu_hang", re.compile(r"kIOGPUCommandBufferCallbackErrorHang")),
    ("gpu_victim", re.compile(r"kIOGPUCommandBufferCallbackErrorInnocentVictim")),
    ("invalid_resource", re.compile(r"kIOGPUCommandBufferCallbackErrorInvalidResource")),
    ("resource_limit", re.compile(r"\[metal::malloc\] Resource limit \(\d+\) exceeded")),
    ("alloc_too_large", re.compile(r"\[metal::malloc\] Attempting to allocate \d+ bytes")),
    ("unable_to_allocate", re.compile(r"\[malloc\] Unable to allocate \d+ bytes")),
    ("segfault", re.compile(r"Segmentation fault|Fatal Python error: Segmentation fault")),
)

# When the log names nothing, the signal still says something useful.
_SIGNAL_KINDS = {
    signal.SIGABRT: "abort",
    signal.SIGSEGV: "segfault",
    signal.SIGKILL: "killed",
    signal.SIGBUS: "bus_error",
    signal.SIGTERM: "terminated",
}


@dataclass(frozen=True)
class Cause:
    """One worker death (or forced kill) as the guard reports it in errors, logs and status."""

    kind: str
    exit_code: int | None
    signal: str | None
    line: str = ""
    time: float = field(default_factory=time.time)
    forced: bool = False  # the guard ended the worker itself (watchdog, wedge, readiness, recycle)

    def describe(self) -> str:
        """Short human text, e.g. ``worker aborted (SIGABRT, rc -6): cmdbuf_oom``."""
        if self.kind == "hang":
            return "worker hung: killed by the guard watchdog"
        if self.kind == "wedged":
            return f"worker wedged ({self.line}): replaced by the guard"
        if self.kind == "not_ready":
            return "worker did not become ready in time"
        if self.forced:
            return f"worker replaced after {self.kind} ({self.line})"
        verb = {
            "SIGABRT": "aborted",
            "SIGSEGV": "crashed",
            "SIGKILL": "was killed",
            "SIGTERM": "was terminated",
        }.get(self.signal or "", "exited")
        how = f"{self.signal}, rc {self.exit_code}" if self.signal else f"rc {self.exit_code}"
        return f"worker {verb} ({how}): {self.kind}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fallback_kind(text: str) -> tuple[str, str]:
    """Return (kind, decisive line) from log text using the built-in patterns."""
    lines = text.splitlines()
    for line in reversed(lines):
        for kind, pattern in _FALLBACK_PATTERNS:
            if pattern.search(line):
                return kind, line.strip()
    return "none", ""


def _shared_kind(text: str) -> tuple[str, str] | None:
    """(kind, decisive line) from the shared classifier; None if it is missing or failed."""
    try:
        from pytest_metaloom.tools.classify import classify_text
    except ImportError:
        return None
    try:
        result = classify_text(text)
    except Exception:  # a classifier bug must never take the guard down
        return None
    kind = getattr(result, "kind", None)
    if not isinstance(kind, str):
        return None
    return kind, str(getattr(result, "decisive_line", None) or "")


def classify_exit(returncode: int | None, stderr_tail: str) -> Cause:
    """Name the cause of a worker exit from its return code and the tail of its stderr."""
    kind, line = _shared_kind(stderr_tail) or _fallback_kind(stderr_tail)
    if kind == "none":
        if returncode is not None and returncode < 0:
            try:
                kind = _SIGNAL_KINDS.get(signal.Signals(-returncode), "signal")
            except ValueError:
                kind = "signal"
        else:
            kind = "exit"
    if not line:
        nonblank = [s.strip() for s in stderr_tail.splitlines() if s.strip()]
        line = nonblank[-1] if nonblank else ""
    return Cause(kind=kind, exit_code=returncode, signal=signal_name(returncode), line=line[:500])


def forced_cause(kind: str, line: str) -> Cause:
    """A cause the guard decided itself (watchdog kill, wedge, readiness timeout, recycle)."""
    return Cause(kind=kind, exit_code=None, signal=None, line=line[:500], forced=True)
