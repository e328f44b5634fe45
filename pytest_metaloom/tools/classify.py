"""Crash-log classifier: name the failure that ended (or wedged) an MLX server from its log.

Operators get a log, not a debugger. This module reads a server log (or a worker's stderr tail,
for ``metaloom-guard``) and says which MLX failure kind it shows, whether it aborted, deferred or
was synchronous, the exit code if the log has one, and what to do about it.

It streams: each physical line is read once, cleaned (CR, ANSI colours, journald and logging
prefixes), and only a few lines are held back to re-join messages a log formatter split. The
kind names are the injector's fault names (``faults.FAULT_KINDS``); they are spelled here too
because ``faults.py`` did not exist when this module was written, and a test checks both agree.
"""

from __future__ import annotations

import io
import re
import signal as _signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pytest_metaloom.inject.faults import FAULT_KINDS

FAULT_KIND_NAMES: tuple[str, ...] = tuple(FAULT_KINDS)
"""The injector's fault kinds, the names the classifier reports."""

EXTRA_KINDS: tuple[str, ...] = ("segfault", "killed", "none")
KINDS: tuple[str, ...] = FAULT_KIND_NAMES + EXTRA_KINDS

OOM_KINDS = frozenset({"alloc_too_large", "resource_limit", "unable_to_allocate", "cmdbuf_oom"})
CMDBUF_KINDS = frozenset(
    {"cmdbuf_oom", "gpu_timeout", "gpu_hang", "gpu_victim", "invalid_resource"}
)

MAX_LINE_CHARS = 65536
"""Longer physical lines are read in pieces, so one giant line cannot exhaust memory."""
JOIN_WINDOW = 4
"""How many following lines may be glued onto a split message."""
MAX_EVENTS = 5000
"""Only the most recent events are kept; the decisive one is near the end of a log."""
BINARY_SNIFF_BYTES = 8192


class UnreadableLogError(ValueError):
    """The input is not a text log (binary, or not decodable at all)."""


@dataclass(frozen=True)
class Classification:
    """What a log shows. ``kind == "none"`` means no failure was found."""

    kind: str
    semantics: str | None = None
    outcome: str | None = None
    decisive_line: str | None = None
    line_number: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    is_oom: bool = False
    advice: str = ""

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready fields (the CLI's ``--json`` output)."""
        return asdict(self)


# --- line cleaning -------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
_PREFIXES = (
    # journald short: "Nov 25 20:19:46 host mlx_lm.server[123]: "
    re.compile(r"^[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2}(?:\.\d+)? \S+ [^\s\[:]+(?:\[\d+\])?: "),
    # journald short-iso / precise: "2025-11-25T20:19:46+0100 host proc[123]: "
    re.compile(r"^\d{4}-\d{2}-\d{2}T[\d:.,]+(?:Z|[+-]\d{2}:?\d{2})? \S+ [^\s\[:]+\[\d+\]: "),
    # timestamps: ISO date-time, or a bare clock, optionally bracketed
    re.compile(
        r"^\[?\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?\]?"
        r"\s*(?:[-|:]\s+)?"
    ),
    re.compile(r"^\[?\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\]?\s*(?:[-|]\s+)?"),
    # logging levels: "INFO - ", "ERROR: ", "[WARNING] "
    re.compile(r"^\[?(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]?(?:\s*[-:|]\s*|\s+)"),
    # supervisor stream tags: "[stderr] ", "stderr | "
    re.compile(r"^(?:\[(?:stderr|stdout)\]\s*|(?:stderr|stdout)\s*\|\s*)"),
)


def clean_line(raw: str) -> str:
    """Strip line endings, colours and known log prefixes, leaving the message text."""
    text = _ANSI.sub("", raw.rstrip("\r\n")).replace("\r", " ").strip()
    for _ in range(6):
        before = text
        for pattern in _PREFIXES:
            text = pattern.sub("", text, count=1).lstrip()
        if text == before:
            break
    return text


# --- message patterns ----------------------------------------------------------------------

_CMDBUF_CODES = {
    "OutOfMemory": "cmdbuf_oom",
    "Timeout": "gpu_timeout",
    "Hang": "gpu_hang",
    "InnocentVictim": "gpu_victim",
    "InvalidResource": "invalid_resource",
}
_CMDBUF_DETAIL_WORDS = (
    ("Insufficient Memory", "cmdbuf_oom"),
    ("GPU Timeout", "gpu_timeout"),
    ("GPU Hang", "gpu_hang"),
    ("victim of GPU error", "gpu_victim"),
    ("Invalid Resource", "invalid_resource"),
)
_CMDBUF = re.compile(r"\[METAL\] Command buffer execution failed:\s*(?P<detail>.*)")
_IOGPU_CODE = re.compile(r"kIOGPUCommandBufferCallbackError(?P<code>[A-Za-z]+)")
_LIBCXX_ABORT = re.compile(r"libc\+\+abi: terminating(?: due to uncaught exception)?")
_TERMINATE_GCC = re.compile(r"terminate called after throwing an instance of")
_ALLOC_TOO_LARGE = re.compile(r"\[metal::malloc\] Attempting to allocate \d+ bytes")
_RESOURCE_LIMIT = re.compile(r"\[metal::malloc\] Resource limit \(\d+\) exceeded")
_UNABLE = re.compile(r"\[malloc\] Unable to allocate \d+ bytes|cudaMalloc\w* failed|out of memory")
_WEDGE = re.compile(r"generation thread died")
_PY_EXC = re.compile(r"^(?:[\w.]+\.)?(?:RuntimeError|MemoryError|ValueError|Exception)\b:?")
_GGML = re.compile(r"ggml_metal\w*: command buffer \d+ failed with status (?P<status>\d+)")
_SEGV = re.compile(r"Segmentation fault|SIGSEGV|Fatal Python error: Segmentation")
_OOM_KILLER = re.compile(
    r"Out of memory: Kill(?:ed)? process|oom-kill(?:er)?\b|invoked oom-killer"
    r"|Memory cgroup out of memory|jetsam|result 'oom-kill'"
)
_KILLED = re.compile(r"^Killed(?:: 9)?$|^(?:\S+: )?(?:line \d+: )?\d+ Killed\b|\bSIGKILL\b")
_ABORTED_SHELL = re.compile(r"Aborted \(core dumped\)|^Aborted$|Abort trap: 6|SIGABRT")

# exit evidence: rc=-6, returncode -11, exited with code 134, exit status 139, status=6/ABRT
_EXIT_NUMERIC = re.compile(
    r"(?:\brc|returncode|return code|exit(?:ed)?(?: with)? (?:code|status)|exit code|status)"
    r"\s*[=:]?\s*\(?(?P<code>-?\d+)\)?(?!\s*/)"
)
_EXIT_SYSTEMD = re.compile(r"status=(?P<num>\d+)/(?P<name>[A-Z]+)")

_TRIGGER = re.compile(
    r"libc\+\+abi|terminate called|\[METAL\]|metal::malloc|\[malloc\]|cuda|thread died"
    r"|ggml_metal|kIOGPU|Segmentation|SIG[A-Z]{3,4}|Out of memory|oom|jetsam|Killed|Abort"
    r"|\brc\b|status=|(?i:exit|returncode|return code)"
)
"""Cheap pre-filter: a line matching none of these cannot start an event."""

_SEVERITY = {
    "cmdbuf_oom": 9,
    "gpu_hang": 8,
    "gpu_timeout": 8,
    "invalid_resource": 7,
    "gpu_victim": 6,
    "unable_to_allocate": 5,
    "alloc_too_large": 5,
    "resource_limit": 5,
    "runtime_error": 2,
    "hang": 2,
    "segfault": 10,
    "killed": 10,
}
_WEDGE_BONUS = 20


def _cmdbuf_kind(text: str) -> str | None:
    """Kind of a command-buffer failure from its code or, failing that, its wording."""
    code = _IOGPU_CODE.search(text)
    if code and code.group("code") in _CMDBUF_CODES:
        return _CMDBUF_CODES[code.group("code")]
    for words, kind in _CMDBUF_DETAIL_WORDS:
        if words in text:
            return kind
    return None


def _message_kind(text: str) -> str | None:
    """The fault kind named by an MLX error text anywhere in ``text``."""
    if _CMDBUF.search(text):
        return _cmdbuf_kind(text) or "cmdbuf_oom"
    if _ALLOC_TOO_LARGE.search(text):
        return "alloc_too_large"
    if _RESOURCE_LIMIT.search(text):
        return "resource_limit"
    if _UNABLE.search(text) and ("[malloc]" in text or "cuda" in text.lower()):
        return "unable_to_allocate"
    return None


def _needs_join(text: str) -> bool:
    """A libc++abi or Metal message that a formatter cut before its end."""
    if _LIBCXX_ABORT.search(text) or _TERMINATE_GCC.search(text):
        return _message_kind(text) is None or not _is_complete_cmdbuf(text)
    if "[METAL]" in text or "[metal::malloc]" in text or "[malloc]" in text:
        return not _is_complete_message(text)
    return False


def _is_complete_cmdbuf(text: str) -> bool:
    if not _CMDBUF.search(text):
        return _message_kind(text) is not None
    return bool(re.search(r"\(0000000\d:kIOGPUCommandBufferCallbackError[A-Za-z]+\)", text))


def _is_complete_message(text: str) -> bool:
    if _CMDBUF.search(text):
        return _is_complete_cmdbuf(text)
    if re.search(r"\[metal::malloc\]|\[malloc\]", text):
        return _message_kind(text) is not None and bool(re.search(r"(?:bytes|exceeded)\.?", text))
    return False


# --- events --------------------------------------------------------------------------------


@dataclass
class _Event:
    line_number: int
    text: str
    kind: str | None = None  # None for pure exit evidence
    semantics: str | None = None
    outcome: str | None = None
    terminal: bool = False
    exit_code: int | None = None
    signal: str | None = None
    oom_killer: bool = False

    @property
    def rank(self) -> int:
        base = _SEVERITY.get(self.kind or "", 0)
        return base + (_WEDGE_BONUS if self.outcome == "wedged" else 0)


def _signal_name(num: int) -> str | None:
    try:
        return _signal.Signals(num).name
    except ValueError:
        return None


def _exit_evidence(text: str) -> tuple[int, str | None] | None:
    """(exit code as printed, or -signal for textual evidence; signal name) if the line has it."""
    systemd = _EXIT_SYSTEMD.search(text)
    if systemd:
        num = int(systemd.group("num"))
        if "code=exited" in text:
            return num, None
        return -num, "SIG" + systemd.group("name")
    numeric = _EXIT_NUMERIC.search(text)
    if numeric and re.search(r"exit|\brc\b|returncode|return code|died|terminated", text, re.I):
        code = int(numeric.group("code"))
        if code < 0:
            return code, _signal_name(-code)
        if 128 < code < 128 + 65:
            return code, _signal_name(code - 128)
        return code, None
    return None


def _events_for(line_number: int, text: str, pending: dict[str, int]) -> list[_Event]:
    """Events on one cleaned logical line. ``pending`` carries short-range context forward."""
    events: list[_Event] = []
    kind = _message_kind(text)

    if _LIBCXX_ABORT.search(text) or _TERMINATE_GCC.search(text):
        events.append(
            _Event(
                line_number,
                text,
                kind=kind or "runtime_error",
                semantics="abort",
                outcome="aborted",
                terminal=True,
                signal="SIGABRT",
            )
        )
    elif _WEDGE.search(text):
        ev = _Event(line_number, text, kind=kind or "runtime_error", outcome="wedged")
        ev.semantics = _semantics_of(text, kind)
        events.append(ev)
    elif _GGML.search(text):
        events.append(_Event(line_number, text, kind="cmdbuf_oom"))
        pending["ggml"] = 2
    elif kind is not None:
        events.append(_Event(line_number, text, kind=kind, semantics=_semantics_of(text, kind)))
    elif pending.get("ggml") and _IOGPU_CODE.search(text):
        # llama.cpp prints the Metal detail on the line after "failed with status 5"
        events.append(_Event(line_number, text, kind=_cmdbuf_kind(text) or "cmdbuf_oom"))
        events[-1].outcome = "ggml_detail"
    elif _SEGV.search(text):
        events.append(_Event(line_number, text, kind="segfault", outcome="aborted", terminal=True))
        events[-1].signal = "SIGSEGV"
        events[-1].exit_code = -11
    elif _OOM_KILLER.search(text):
        ev = _Event(line_number, text, kind="killed", outcome="aborted", terminal=True)
        ev.signal, ev.exit_code, ev.oom_killer = "SIGKILL", -9, True
        events.append(ev)
    elif _KILLED.search(text) and _exit_evidence(text) is None:
        ev = _Event(line_number, text, kind="killed", outcome="aborted", terminal=True)
        ev.signal, ev.exit_code = "SIGKILL", -9
        events.append(ev)
    elif _ABORTED_SHELL.search(text) and _exit_evidence(text) is None:
        events.append(_Event(line_number, text, exit_code=-6, signal="SIGABRT"))

    if pending.get("ggml") and not _GGML.search(text):
        pending["ggml"] -= 1

    exit_info = _exit_evidence(text)
    if exit_info is not None:
        events.append(_Event(line_number, text, exit_code=exit_info[0], signal=exit_info[1]))
    return events


def _semantics_of(text: str, kind: str | None) -> str | None:
    """abort / deferred / sync, judged from how the message reached the log."""
    if kind is None:
        return None
    if kind in CMDBUF_KINDS:
        stripped = text.rstrip()
        if _PY_EXC.search(stripped) or "RuntimeError" in stripped or stripped.endswith("."):
            return "deferred"
        if "generation thread died" in stripped:
            return "deferred"
        return None
    if kind in OOM_KINDS:
        return "sync"
    return None


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
        if not _TRIGGER.search(raw):
            yield number, ""
            fill()
            continue
        text = clean_line(raw)
        if text and _needs_join(text):
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
            if _is_joined_complete(candidate):
                return candidate, used
    return first, 0


def _is_joined_complete(text: str) -> bool:
    if _LIBCXX_ABORT.search(text) or _TERMINATE_GCC.search(text):
        return _message_kind(text) is not None and _is_complete_cmdbuf(text)
    return _is_complete_message(text)


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
        if not text:
            return
        new = _events_for(number, text, self.pending)
        for ev in new:
            self._attach(ev)
        if self._wedge is not None:
            self._wedge_lines += 1
            if self._wedge_lines > 200:
                self._wedge = None

    def _attach(self, ev: _Event) -> None:
        last = self.events[-1] if self.events else None
        if ev.outcome == "ggml_detail":
            ev.outcome = None
            if last is not None and last.kind == "cmdbuf_oom" and _GGML.search(last.text):
                last.kind = ev.kind
                last.text = f"{last.text} / {ev.text}"
                return
        if ev.kind is not None and ev.outcome == "wedged":
            self._wedge, self._wedge_lines = ev, 0
        elif self._wedge is not None and ev.kind is not None and not ev.terminal:
            # the traceback after "generation thread died" ends with the exception's text
            if self._wedge.kind == "runtime_error":
                self._wedge.kind = ev.kind
                self._wedge.semantics = ev.semantics
            if ev.kind == self._wedge.kind:
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
                advice=_advice("none", None),
            )
        exit_code = decisive.exit_code
        sig = decisive.signal
        if exit_ev is not None:
            exit_code, sig = exit_ev.exit_code, exit_ev.signal or sig
        semantics, outcome = decisive.semantics, decisive.outcome
        ended = exit_ev is not None and exit_ev.exit_code not in (None, 0)
        if sig == "SIGABRT" and decisive.kind in CMDBUF_KINDS | {"runtime_error"}:
            semantics = semantics if semantics == "deferred" else "abort"
        if ended and outcome is None:
            outcome = "aborted"
        kind = decisive.kind or "runtime_error"
        return Classification(
            kind=kind,
            semantics=semantics,
            outcome=outcome,
            decisive_line=decisive.text,
            line_number=decisive.line_number,
            exit_code=exit_code,
            signal=sig,
            is_oom=kind in OOM_KINDS or decisive.oom_killer,
            advice=_WEDGE_ADVICE + _advice(kind, semantics)
            if outcome == "wedged"
            else _advice(kind, semantics),
        )


def _decide(events: list[_Event]) -> tuple[_Event | None, _Event | None]:
    """(decisive event, exit evidence for it). The process-ending event wins, else the worst."""
    faults = [e for e in events if e.kind is not None]
    exits = [e for e in events if e.kind is None and e.exit_code is not None]
    enders = [e for e in events if e.terminal or (e.kind is None and e.exit_code not in (None, 0))]
    if enders:
        last = enders[-1]
        if last.kind is not None:
            after = [e for e in exits if e.line_number >= last.line_number]
            return last, (after[0] if after else None)
        earlier_exits = [e for e in exits if e.line_number < last.line_number and e is not last]
        start = earlier_exits[-1].line_number if earlier_exits else 0
        window = [e for e in faults if start <= e.line_number <= last.line_number]
        terminals = [e for e in window if e.terminal]
        if terminals:
            return terminals[-1], last
        if window:
            return max(window, key=lambda e: (e.rank, e.line_number)), last
        synthetic = _Event(last.line_number, last.text, kind=_kind_from_exit(last), terminal=True)
        synthetic.outcome = "aborted"
        return synthetic, last
    if faults:
        best = max(faults, key=lambda e: (e.rank, e.line_number))
        return best, (exits[-1] if exits else None)
    return None, (exits[-1] if exits else None)


def _kind_from_exit(ev: _Event) -> str:
    if ev.signal == "SIGSEGV":
        return "segfault"
    if ev.signal == "SIGKILL":
        return "killed"
    return "runtime_error"


# --- advice --------------------------------------------------------------------------------

_WEDGE_ADVICE = (
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
    "none": "No MLX failure, crash or kill found in this log.",
}


def _advice(kind: str, semantics: str | None) -> str:
    if kind in CMDBUF_KINDS and kind != "cmdbuf_oom":
        return _ADVICE[kind]  # type: ignore[return-value]
    if kind == "cmdbuf_oom":
        return _ADVICE[("cmdbuf_oom", semantics if semantics in ("abort", "deferred") else None)]
    return _ADVICE.get(kind, _ADVICE["runtime_error"])  # type: ignore[return-value]


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
