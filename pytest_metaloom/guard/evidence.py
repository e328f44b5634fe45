"""What a live worker's own words say about a failure: its log since a request, its answers.

Two sources, both the worker's: the stderr it wrote while a request was in its hands (where
``mlx_lm.server`` logs the death of its generation loop, and Python prints the traceback of a
handler that failed), and the bodies it answers with (``404 {"error": "generation thread died"}``
from a wedged ``mlx_lm.server``). Pure text in, facts out: no sockets, no processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Bodies a worker answers with once its generation loop is gone, per worker kind the guard knows.
# mlx_lm.server 0.32: every completion after the loop died gets 404 {"error": "generation thread
# died"} (and its /health answers 503).
WEDGE_MARKERS: tuple[bytes, ...] = (b"generation thread died",)

# The log line of the loop's own death carries the error that killed it ("...died: <error>");
# a handler that noticed the death later logs a bare "RuntimeError: generation thread died".
_LOOP_DEATH = re.compile(r"generation thread died: (?P<error>\S.*)$")
_TRACEBACK = "Traceback (most recent call last):"
_EXC_LINE = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(?P<msg>.*))?$"
)
# A client that went away is not a worker failure.
_NOT_FAILURES = ("BrokenPipeError", "ConnectionResetError", "ConnectionAbortedError")

# Kinds the guard answers with 503: the device or its memory failed, not the request's own logic.
_NON_DEVICE = {"none", "runtime_error", "hang", "segfault", "killed"}


@dataclass(frozen=True)
class LogFailure:
    """A failure the worker logged: the error text, its named kind, and whether the loop died."""

    error: str
    kind: str  # a classifier kind ("resource_limit", "cmdbuf_oom", ...) or "runtime_error"
    loop_died: bool
    is_oom: bool

    @property
    def device_failure(self) -> bool:
        """A memory or GPU failure (503 territory), as opposed to a bug in the request's path."""
        return self.kind not in _NON_DEVICE

    def summary(self) -> str:
        where = "generation loop died" if self.loop_died else "request failed"
        return f"{where}: {self.error}"[:300]


def says_wedged(body: bytes) -> bool:
    """True if an answer's body is a worker's own word that its generation loop is gone."""
    return any(marker in body for marker in WEDGE_MARKERS)


def _kind_of(error: str) -> tuple[str, bool]:
    """(kind, is_oom) of one error text with the shared classifier; runtime_error if unnamed."""
    try:
        from pytest_metaloom.tools.classify import classify_text
    except ImportError:  # the guard must work without the harness around it
        return "runtime_error", False
    try:
        result = classify_text(error)
    except Exception:  # a classifier bug must never take the guard down
        return "runtime_error", False
    kind = result.kind if result.kind != "none" else "runtime_error"
    return kind, bool(result.is_oom)


def _last_exception(lines: list[str]) -> str | None:
    """The final exception line of the last Python traceback in ``lines`` (None without one)."""
    start = max((i for i, line in enumerate(lines) if _TRACEBACK in line), default=-1)
    if start < 0:
        return None
    found = None
    for line in lines[start + 1 :]:
        if line.startswith((" ", "\t")):
            continue
        m = _EXC_LINE.match(line.strip())
        if m:
            found = line.strip()
            break
    return found


def read_failure(text: str) -> LogFailure | None:
    """The failure a stretch of worker log shows, if any; the loop's own death wins."""
    lines = text.splitlines()
    for line in reversed(lines):
        m = _LOOP_DEATH.search(line)
        if m:
            error = m.group("error").strip()
            kind, oom = _kind_of(error)
            return LogFailure(error=error, kind=kind, loop_died=True, is_oom=oom)
    exc = _last_exception(lines)
    if exc is None or exc.startswith(_NOT_FAILURES):
        return None
    m = _EXC_LINE.match(exc)
    error = (m.group("msg") if m and m.group("msg") else exc).strip()
    if says_wedged(error.encode()):
        return None  # a handler noticed a loop that died before this stretch: not this request
    kind, oom = _kind_of(error)
    return LogFailure(error=error, kind=kind, loop_died=False, is_oom=oom)
