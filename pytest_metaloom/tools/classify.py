"""Crash-log classifier: name the failure that ended (or wedged) an MLX server from its log.

Operators get a log, not a debugger. This module reads a server log (or a worker's stderr tail,
for ``metaloom-guard``) and says which failure kind it shows, whether it aborted, deferred or
was synchronous, the exit code if the log has one, how sure it is, and what to do about it.

It matches the stable parts of failure texts rather than whole sentences: Apple's command-buffer
error codes (``kIOGPUCommandBufferCallbackError*``, ``IOAF code N``), llama.cpp's ``status 5``,
the allocator families (MLX's ``[malloc]``/``[malloc_or_wait]``/``[metal::malloc]`` texts,
ggml's buffer failures, CUDA's ``cudaMalloc*``), death reports from shells, launchd, systemd and
supervisors, kernel panics, and Python tracebacks of generation threads. ``confidence`` is
``low`` where the log alone cannot settle the kind (a bare ``status 5``, a crash report without
the exception text, an abort with no message), and ``confidence_note`` says why.

It streams: each physical line is read once, cleaned (CR, ANSI colours, journald and logging
prefixes), and only a few lines are held back to re-join messages a log formatter split. The
fault kind names are the injector's (``inject.faults.FAULT_KINDS``); the classifier adds a few
kinds of its own for what the injector does not simulate (``EXTRA_KINDS``).
"""

from __future__ import annotations

import io
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

from pytest_metaloom.inject.faults import FAULT_KINDS
from pytest_metaloom.tools.classify_advice import WEDGE_ADVICE, advice
from pytest_metaloom.tools.classify_words import (
    ABORT_FRAME,
    ABORTED_SHELL,
    ALWAYS_FAILURES,
    ASSERT_FRAME,
    BENIGN_EXCEPTIONS,
    CHECK_ERROR,
    CLIENT_ERROR,
    CMDBUF_KINDS,
    FAILED_ASSERTION,
    GENERATION_THREAD,
    GGML_ASSERT,
    HIGH,
    IOGPU_CODE,
    KERNEL_PANIC,
    KILLED,
    LIBCXX_ABORT,
    LOOP_ERROR,
    LOW,
    LOW_NOTES,
    MEMORY_WARNING,
    OBJC_ABORT,
    OOM_KILLER,
    OOM_KINDS,
    PY_EXC_LINE,
    RUNNER,
    SEGV,
    STATUS,
    TERMINATE_GCC,
    THREAD_DEATH,
    TRACEBACK,
    TRIGGER,
    WEDGE,
    abort_message,
    clean_line,
    death,
    exit_evidence,
    is_joined_complete,
    message_kind,
    needs_join,
    semantics_of,
    signal_number,
)

FAULT_KIND_NAMES: tuple[str, ...] = tuple(FAULT_KINDS)
"""The injector's fault kinds, the names the classifier reports."""

EXTRA_KINDS: tuple[str, ...] = ("gpu_error", "kernel_panic", "segfault", "killed", "none")
"""Kinds the injector does not simulate: a command-buffer failure whose code is none of the
injector's (or is not in the log), a macOS kernel panic, a crash by signal, and no failure."""
KINDS: tuple[str, ...] = FAULT_KIND_NAMES + EXTRA_KINDS


MAX_LINE_CHARS = 65536
"""Longer physical lines are read in pieces, so one giant line cannot exhaust memory."""
JOIN_WINDOW = 4
"""How many following lines may be glued onto a split message."""
MAX_EVENTS = 5000
"""Only the most recent events are kept; the decisive one is near the end of a log."""
BINARY_SNIFF_BYTES = 8192
TRACEBACK_WINDOW = 300
"""An exception line counts as a failure when a traceback started at most this many lines before."""
ABORT_CONTEXT_LINES = 50
"""How far before a bare abort line the report of the same abort, with its reason, may be."""
WEDGE_WINDOW = 200
"""How long after a generation thread's death its traceback may still name the exception."""


class UnreadableLogError(ValueError):
    """The input is not a text log (binary, or not decodable at all)."""


@dataclass(frozen=True)
class Classification:
    """What a log shows. ``kind == "none"`` means no failure was found.

    ``confidence`` is ``"high"`` when the log alone settles the kind and ``"low"`` when the
    kind is the most likely reading of incomplete evidence; ``confidence_note`` then says what
    is missing.
    """

    kind: str
    semantics: str | None = None
    outcome: str | None = None
    decisive_line: str | None = None
    line_number: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    is_oom: bool = False
    advice: str = ""
    confidence: str = HIGH
    confidence_note: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready fields (the CLI's ``--json`` output)."""
        return asdict(self)


_SEVERITY = {
    "cmdbuf_oom": 9,
    "gpu_hang": 8,
    "gpu_timeout": 8,
    "invalid_resource": 7,
    "gpu_victim": 6,
    "gpu_error": 6,
    "unable_to_allocate": 5,
    "alloc_too_large": 5,
    "resource_limit": 5,
    "runtime_error": 2,
    "hang": 2,
    "segfault": 10,
    "killed": 10,
    "kernel_panic": 11,
}
_WEDGE_BONUS = 20


# --- events --------------------------------------------------------------------------------


@dataclass
class _Event:
    line_number: int
    text: str
    kind: str | None = None  # None for pure exit evidence or a marker
    semantics: str | None = None
    outcome: str | None = None
    terminal: bool = False
    exit_code: int | None = None
    signal: str | None = None
    oom_killer: bool = False
    confidence: str = HIGH
    note: str | None = None
    status_line: bool = False  # a ggml "status 5" line still waiting for its detail
    memory_warning: bool = False

    @property
    def rank(self) -> tuple[int, int, int]:
        base = _SEVERITY.get(self.kind or "", 0)
        bonus = _WEDGE_BONUS if self.outcome == "wedged" else 0
        return base + bonus, int(self.confidence == HIGH), self.line_number


def _signal_event(line_number: int, text: str, sig: str) -> _Event:
    """A death by signal: segfault and kill are kinds of their own, an abort is exit evidence."""
    num = signal_number(sig)
    code = -num if num else None
    if sig in ("SIGSEGV", "SIGBUS"):
        return _Event(line_number, text, "segfault", None, "aborted", True, code, sig)
    if sig == "SIGKILL":
        return _Event(line_number, text, "killed", None, "aborted", True, code, sig)
    return _Event(line_number, text, exit_code=code, signal=sig)


def _aborted(line_number: int, text: str, kind: str, note: str | None = None) -> _Event:
    """The process aborted (SIGABRT) on this line; a ``note`` marks the kind as a low guess."""
    ev = _Event(line_number, text, kind, "abort", "aborted", True, signal="SIGABRT")
    if note is not None:
        ev.confidence, ev.note = LOW, note
    return ev


def _assert_event(line_number: int, text: str, match: re.Match[str]) -> _Event:
    cond = (match.group("cond1") or match.group("cond2") or "").strip()
    if cond in ("", "false", "0"):
        note = "an unconditional assertion aborted the process; the log does not say why"
        return _aborted(line_number, text, "runtime_error", note)
    return _aborted(line_number, text, "runtime_error")


def _abort_event(line_number: int, text: str) -> _Event:
    """libc++abi / GCC terminate: an uncaught C++ exception ends the process with SIGABRT."""
    found = message_kind(text)
    if found:
        kind, confidence = found
        return _aborted(line_number, text, kind, LOW_NOTES.get(kind) if confidence == LOW else None)
    if not abort_message(text):
        note = "an uncaught C++ exception aborted the process; its message is not in the log"
        return _aborted(line_number, text, "runtime_error", note)
    return _aborted(line_number, text, "runtime_error")


def _python_event(line_number: int, text: str, in_traceback: bool) -> _Event | None:
    """A Python failure: a generation loop's error line, a client's error body, an exception."""
    loop = LOOP_ERROR.search(text) or CLIENT_ERROR.search(text)
    exc = PY_EXC_LINE.match(text)
    if loop:
        message = loop.group("msg")
    elif exc and exc.group("exc").split(".")[-1] in BENIGN_EXCEPTIONS:
        return None
    elif exc and (in_traceback or exc.group("exc").split(".")[-1] in ALWAYS_FAILURES):
        message = exc.group("msg")
    else:
        return None
    found = message_kind(message)
    if found:
        ev = _Event(line_number, text, found[0], confidence=found[1])
        ev.semantics = semantics_of(text, found[0])
        ev.note = LOW_NOTES.get(found[0]) if found[1] == LOW else None
        return ev
    return _Event(line_number, text, "runtime_error")


def _runner_event(line_number: int, text: str) -> _Event | None:
    """A supervisor's report that its runner failed with a message (Ollama's wording)."""
    runner = RUNNER.search(text)
    if not runner:
        return None
    message = re.sub(r"\s*\(exit: [^)]*\)\s*\"?$", "", runner.group("msg")).strip(' "')
    message = re.sub(r"^(?:error|Error|panic|mlx)\s*:\s*", "", message)
    if not message or death(message):
        return None
    found = message_kind(message)
    if found:
        return _Event(line_number, text, found[0], confidence=found[1])
    return _Event(line_number, text, "runtime_error")


def _crash_event(line_number: int, text: str) -> _Event | None:
    """An abort, an assertion, a crash-report frame or a kernel panic on this line, if any."""
    if LIBCXX_ABORT.search(text) or TERMINATE_GCC.search(text):
        return _abort_event(line_number, text)
    if OBJC_ABORT.search(text) or FAILED_ASSERTION.search(text):
        return _aborted(line_number, text, "runtime_error")
    assertion = GGML_ASSERT.search(text)
    if assertion:
        return _assert_event(line_number, text, assertion)
    if ASSERT_FRAME.search(text):
        note = "a crash report shows an assertion failed, but not which one"
        return _aborted(line_number, text, "runtime_error", note)
    if ABORT_FRAME.search(text):
        return _Event(line_number, text, exit_code=-6, signal="SIGABRT")
    if KERNEL_PANIC.search(text):
        return _Event(line_number, text, "kernel_panic", outcome="aborted", terminal=True)
    if CHECK_ERROR.search(text):
        return _aborted(line_number, text, "gpu_error", LOW_NOTES["gpu_error"])
    return None


def _death_event(line_number: int, text: str, sig: str | None) -> _Event | None:
    """A death reported by the process, the kernel, a shell or a supervisor, if any."""
    if SEGV.search(text):
        return _Event(line_number, text, "segfault", None, "aborted", True, -11, "SIGSEGV")
    if OOM_KILLER.search(text):
        ev = _Event(line_number, text, "killed", None, "aborted", True, -9, "SIGKILL")
        ev.oom_killer = True
        return ev
    if sig is not None:
        return _signal_event(line_number, text, sig)
    if KILLED.search(text) and exit_evidence(text) is None:
        return _Event(line_number, text, "killed", None, "aborted", True, -9, "SIGKILL")
    if ABORTED_SHELL.search(text) and exit_evidence(text) is None:
        return _Event(line_number, text, exit_code=-6, signal="SIGABRT")
    return None


def _fault_event(line_number: int, text: str, found: tuple[str, str]) -> _Event:
    ev = _Event(line_number, text, found[0], confidence=found[1])
    ev.semantics = semantics_of(text, found[0])
    ev.note = LOW_NOTES.get(found[0]) if found[1] == LOW else None
    return ev


def _wedge_event(line_number: int, text: str, found: tuple[str, str] | None) -> _Event:
    """The generation thread died: the process lives on, wedged."""
    kind, confidence = found or ("runtime_error", LOW)
    ev = _Event(line_number, text, kind, outcome="wedged", confidence=confidence)
    ev.semantics = semantics_of(text, found[0] if found else None)
    if not found:
        ev.note = "the generation thread died; the log does not show the exception"
    return ev


def _events_for(line_number: int, text: str, pending: dict[str, int]) -> list[_Event]:
    """Events on one cleaned logical line. ``pending`` carries short-range context forward."""
    if TRACEBACK.search(text):
        pending["traceback"] = line_number
    since_traceback = line_number - pending.get("traceback", -TRACEBACK_WINDOW - 1)
    found = message_kind(text)
    thread = THREAD_DEATH.match(text)
    sig = death(text)

    event = _crash_event(line_number, text)
    if event is None and (WEDGE.search(text) or (thread and GENERATION_THREAD.search(thread[1]))):
        event = _wedge_event(line_number, text, found)
        pending["traceback"] = line_number
    elif event is None and STATUS.search(text) and not IOGPU_CODE.search(text):
        event = _Event(line_number, text, "gpu_error", confidence=LOW, status_line=True)
        event.note = LOW_NOTES["gpu_error"]
    elif event is None and found is not None:
        event = _fault_event(line_number, text, found)
    if event is None:
        event = _death_event(line_number, text, sig)
    if event is None:
        event = _python_event(line_number, text, since_traceback <= TRACEBACK_WINDOW)
        event = event or _runner_event(line_number, text)
    if event is None and MEMORY_WARNING.search(text):
        event = _Event(line_number, text, memory_warning=True)

    events = [event] if event is not None else []
    if sig is not None and event is not None and event.kind not in (None, "segfault", "killed"):
        # a fault and the death it caused reported on one line: "... (exit: signal: abort trap)"
        events.append(_signal_event(line_number, text, sig))
    exit_info = exit_evidence(text)
    if exit_info is not None:
        events.append(_Event(line_number, text, exit_code=exit_info[0], signal=exit_info[1]))
    return events


# --- reading -------------------------------------------------------------------------------


def _physical_lines(stream: IO[str]) -> Iterator[str]:
    while True:
        piece = stream.readline(MAX_LINE_CHARS)
        if not piece:
            return
        yield piece


def _logical_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """Cleaned lines, with messages split across up to ``JOIN_WINDOW`` lines glued back.

    Lines without any trigger word are passed on empty without cleaning: that keeps a large
    log to one cheap regex search per line.
    """
    ahead: deque[tuple[int, str]] = deque()
    source = iter(enumerate(lines, start=1))

    def fill() -> None:
        while len(ahead) < JOIN_WINDOW + 1:
            try:
                ahead.append(next(source))
            except StopIteration:
                return

    fill()
    while ahead:
        number, raw = ahead.popleft()
        if not TRIGGER.search(raw):
            yield number, ""
            fill()
            continue
        text = clean_line(raw)
        if text and needs_join(text):
            fill()
            following = [(n, clean_line(r)) for n, r in ahead]
            joined, used = _try_join(text, following)
            for _ in range(used):
                ahead.popleft()
            text = joined
        yield number, text
        fill()


def _try_join(first: str, following: list[tuple[int, str]]) -> tuple[str, int]:
    """The shortest join of ``first`` with following lines that completes the message."""
    for used in range(1, min(JOIN_WINDOW, len(following)) + 1):
        parts = [first] + [t for _, t in following[:used]]
        for sep in (" ", ""):
            candidate = sep.join(parts)
            if is_joined_complete(candidate):
                return candidate, used
    if following and following[0][1] and abort_message(first) == "":
        # an abort whose message is on the next line and names no known failure
        return f"{first} {following[0][1]}", 1
    return first, 0


def _open_text(binary: IO[bytes]) -> IO[str]:
    """Reject binary input early, then decode leniently (logs are sometimes mixed encodings)."""
    if not isinstance(binary, io.BufferedReader):
        binary = io.BufferedReader(binary)  # type: ignore[arg-type]
    head = binary.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]
    _check_text(head)
    return io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline=None)


def _check_text(head: bytes) -> None:
    if b"\x00" in head:
        raise UnreadableLogError("input contains NUL bytes: it is a binary file, not a text log")
    if head:
        decoded = head.decode("utf-8", errors="replace")
        bad = decoded.count("\ufffd")
        if bad > max(8, len(decoded) // 10):
            raise UnreadableLogError(
                "input is not UTF-8 text (mostly undecodable bytes): pass the server's text log"
            )


# --- resolution ----------------------------------------------------------------------------


class _Collector:
    """Consumes events in order; keeps a bounded recent history."""

    def __init__(self) -> None:
        self.events: deque[_Event] = deque(maxlen=MAX_EVENTS)
        self.pending: dict[str, int] = {}
        self._wedge: _Event | None = None
        self._wedge_lines = 0

    def feed(self, number: int, text: str) -> None:
        if self._wedge is not None:
            self._wedge_lines += 1
            if self._wedge_lines > WEDGE_WINDOW:
                self._wedge = None
        if not text:
            return
        for ev in _events_for(number, text, self.pending):
            self._attach(ev)

    def _attach(self, ev: _Event) -> None:
        last = self.events[-1] if self.events else None
        near = last is not None and ev.line_number - last.line_number <= 2
        if near and last is not None and last.kind in CMDBUF_KINDS:
            # llama.cpp prints "status 5" and the Metal detail on neighbouring lines, in
            # either order: keep one event, with the detail's kind and the status line's place
            if last.status_line and ev.kind in CMDBUF_KINDS and not ev.status_line:
                last.kind, last.confidence, last.note = ev.kind, ev.confidence, ev.note
                last.text, last.status_line = f"{last.text} / {ev.text}", False
                return
            if ev.status_line and not last.status_line:
                return
        if ev.kind is not None and ev.outcome == "wedged":
            self._wedge, self._wedge_lines = ev, 0
        elif self._wedge is not None and ev.kind is not None and not ev.terminal:
            # the traceback after a generation thread's death ends with the exception's text
            wedge = self._wedge
            if wedge.kind == "runtime_error":
                wedge.kind, wedge.semantics = ev.kind, ev.semantics
                wedge.confidence, wedge.note = ev.confidence, ev.note
            if ev.kind == wedge.kind:
                return
        self.events.append(ev)

    def result(self) -> Classification:
        events = list(self.events)
        decisive, exit_ev = _decide(events)
        if decisive is None:
            code = exit_ev.exit_code if exit_ev else None
            return Classification(
                kind="none",
                exit_code=code,
                signal=exit_ev.signal if exit_ev else None,
                advice=advice("none", None),
            )
        exit_code = decisive.exit_code
        sig = decisive.signal
        if exit_ev is not None:
            exit_code, sig = exit_ev.exit_code, exit_ev.signal or sig
        semantics, outcome = decisive.semantics, decisive.outcome
        ended = exit_ev is not None and exit_ev.exit_code not in (None, 0)
        if sig == "SIGABRT" and decisive.kind in CMDBUF_KINDS | OOM_KINDS | {"runtime_error"}:
            semantics = semantics if semantics == "deferred" else "abort"
        if ended and outcome is None:
            outcome = "aborted"
        kind = decisive.kind or "runtime_error"
        confidence, note = decisive.confidence, decisive.note
        if kind == "runtime_error" and confidence == HIGH and _warned(events, decisive):
            confidence = LOW
            note = "the log warns that memory ran past the working set before this failure"
        return Classification(
            kind=kind,
            semantics=semantics,
            outcome=outcome,
            decisive_line=decisive.text,
            line_number=decisive.line_number,
            exit_code=exit_code,
            signal=sig,
            is_oom=kind in OOM_KINDS or decisive.oom_killer,
            advice=WEDGE_ADVICE + advice(kind, semantics)
            if outcome == "wedged"
            else advice(kind, semantics),
            confidence=confidence,
            confidence_note=note if confidence == LOW else None,
        )


def _warned(events: list[_Event], decisive: _Event) -> bool:
    return any(e.memory_warning and e.line_number <= decisive.line_number for e in events)


def _decide(events: list[_Event]) -> tuple[_Event | None, _Event | None]:
    """(decisive event, exit evidence for it). The process-ending event wins, else the worst."""
    faults = [e for e in events if e.kind is not None]
    exits = [e for e in events if e.kind is None and e.exit_code is not None]
    enders = [e for e in events if e.terminal or (e.kind is None and e.exit_code not in (None, 0))]
    if enders:
        last = enders[-1]
        earlier_exits = [e for e in exits if e.line_number < last.line_number and e is not last]
        start = earlier_exits[-1].line_number if earlier_exits else 0
        window = [e for e in faults if start <= e.line_number <= last.line_number]
        terminals = [e for e in window if e.terminal]
        if last.kind is not None:
            after = [e for e in exits if e.line_number >= last.line_number]
            decisive = _root_cause(_best_terminal(terminals, last), faults)
            return decisive, (after[0] if after else None)
        if terminals:
            return _root_cause(_best_terminal(terminals, terminals[-1]), faults), last
        if window:
            return max(window, key=lambda e: e.rank), last
        synthetic = _Event(last.line_number, last.text, kind=_kind_from_exit(last), terminal=True)
        synthetic.outcome = "aborted"
        if synthetic.kind == "runtime_error":
            synthetic.confidence = LOW
            synthetic.note = "the process died, but the log does not say of what"
        return synthetic, last
    if faults:
        return max(faults, key=lambda e: e.rank), (exits[-1] if exits else None)
    return None, (exits[-1] if exits else None)


def _best_terminal(terminals: list[_Event], last: _Event) -> _Event:
    """The last process-ending event, unless it lacks a message that one just before it has.

    One death is often reported twice: an Objective-C or assertion line with the reason, then a
    bare ``libc++abi: terminating`` or crash frame. The one that says why wins.
    """
    if last.confidence == HIGH:
        return last
    near = [
        e
        for e in terminals
        if e.confidence == HIGH and last.line_number - e.line_number <= ABORT_CONTEXT_LINES
    ]
    return near[-1] if near else last


def _reason(text: str) -> str | None:
    match = re.search(r"failed:\s*(?P<why>[^.\n]+)", text)
    return match.group("why").strip() if match else None


def _root_cause(ender: _Event, faults: list[_Event]) -> _Event:
    """An abort that repeats an earlier, more specific failure's reason has that root cause.

    CUDA errors are sticky: after one failure every later call fails with the same reason, so
    the first failure is the one that names what went wrong.
    """
    if ender.kind != "runtime_error":
        return ender
    why = _reason(ender.text)
    if why is None:
        return ender
    for earlier in faults:
        if earlier is ender or earlier.line_number >= ender.line_number:
            continue
        if earlier.kind not in (None, "runtime_error") and _reason(earlier.text) == why:
            return replace(
                ender, kind=earlier.kind, confidence=earlier.confidence, note=earlier.note
            )
    return ender


def _kind_from_exit(ev: _Event) -> str:
    if ev.signal in ("SIGSEGV", "SIGBUS"):
        return "segfault"
    if ev.signal == "SIGKILL":
        return "killed"
    return "runtime_error"


# --- public API ----------------------------------------------------------------------------


def classify_lines(lines: Iterable[str]) -> Classification:
    """Classify an iterable of raw log lines (streamed; lines are not kept)."""
    collector = _Collector()
    for number, text in _logical_lines(lines):
        collector.feed(number, text)
    return collector.result()


def classify_text(text: str) -> Classification:
    """Classify a whole log held in a string."""
    if "\x00" in text:
        raise UnreadableLogError("input contains NUL bytes: it is a binary file, not a text log")
    return classify_lines(io.StringIO(text, newline=None))


def classify_stream(binary: IO[bytes]) -> Classification:
    """Classify a binary stream (a file or stdin), streaming it line by line."""
    text = _open_text(binary)
    return classify_lines(_physical_lines(text))


def classify_file(path: str | Path) -> Classification:
    """Classify a log file; ``-`` reads standard input."""
    if str(path) == "-":
        return classify_stream(sys.stdin.buffer)
    with open(path, "rb") as handle:
        return classify_stream(handle)


STDERR_TAIL_CHARS = 65536


def classify_stderr_tail(text: str, max_chars: int = STDERR_TAIL_CHARS) -> Classification:
    """Classify the end of a worker's stderr (used by ``metaloom-guard``).

    Only the last ``max_chars`` are read; a first line cut in the middle is dropped so a
    half-message cannot be misread.
    """
    if len(text) > max_chars:
        tail = text[-max_chars:]
        newline = tail.find("\n")
        text = tail[newline + 1 :] if newline >= 0 else tail
    return classify_text(text.replace("\x00", ""))
