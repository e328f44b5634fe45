"""The wordings the crash-log classifier recognises: stable parts of failure texts.

One table per family: Apple's command-buffer error codes, the allocator texts of MLX, ggml and
CUDA, death reports from shells, service managers and supervisors, uncaught aborts and
assertions, kernel panics, and Python failures in generation threads. ``classify`` turns
lines into events with these; keeping the wordings here lets a new one be added without
touching how events are weighed.
"""

from __future__ import annotations

import re
import signal as _signal

OOM_KINDS = frozenset({"alloc_too_large", "resource_limit", "unable_to_allocate", "cmdbuf_oom"})
CMDBUF_KINDS = frozenset(
    {"cmdbuf_oom", "gpu_timeout", "gpu_hang", "gpu_victim", "invalid_resource", "gpu_error"}
)
HIGH, LOW = "high", "low"
CONFIDENCES: tuple[str, ...] = (HIGH, LOW)


# --- line cleaning -------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
PREFIXES = (
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
    # logging levels: "INFO - ", "ERROR: ", "[WARNING] ", "[error] "
    re.compile(
        r"^\[?(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL|debug|info|warning|error)\]?"
        r"(?:\s*[-:|]\s*|\s+)"
    ),
    # supervisor stream tags: "[stderr] ", "stderr | "
    re.compile(r"^(?:\[(?:stderr|stdout)\]\s*|(?:stderr|stdout)\s*\|\s*)"),
)


def clean_line(raw: str) -> str:
    """Strip line endings, colours and known log prefixes, leaving the message text."""
    text = ANSI.sub("", raw.rstrip("\r\n")).replace("\r", " ").strip()
    for _ in range(6):
        before = text
        for pattern in PREFIXES:
            text = pattern.sub("", text, count=1).lstrip()
        if text == before:
            break
    return text


# --- command-buffer failures ---------------------------------------------------------------

CODE_KINDS = {
    "OutOfMemory": "cmdbuf_oom",
    "Timeout": "gpu_timeout",
    # macOS preempts a command buffer that monopolises the GPU: a watchdog, like Timeout
    "ImpactingInteractivity": "gpu_timeout",
    "Hang": "gpu_hang",
    "InnocentVictim": "gpu_victim",
    "InvalidResource": "invalid_resource",
    # the GPU touched an unmapped address: a use of a freed or invalid buffer
    "PageFault": "invalid_resource",
}
# the same codes by number, for "(IOAF code 8)" and an 8-digit number without its name
NUMBER_KINDS = {2: "gpu_timeout", 3: "gpu_hang", 5: "gpu_victim", 8: "cmdbuf_oom"}
NUMBER_KINDS.update({9: "invalid_resource", 11: "invalid_resource", 14: "gpu_timeout"})
DETAIL_WORDS = (
    ("Insufficient Memory", "cmdbuf_oom"),
    ("GPU Timeout", "gpu_timeout"),
    ("Impacting Interactivity", "gpu_timeout"),
    ("GPU Hang", "gpu_hang"),
    ("victim of GPU error", "gpu_victim"),
    ("Invalid Resource", "invalid_resource"),
    ("GPU Address Fault", "invalid_resource"),
    ("for causing prior/excessive GPU errors", "gpu_error"),
)
IOGPU_CODE = re.compile(
    r"(?:(?P<num>[0-9A-Fa-f]{8}):\s*)?kIO(?:GPU|Accel)CommandBufferCallbackError(?P<code>[A-Za-z]+)"
)
IOGPU_COMPLETE = re.compile(r"\([0-9A-Fa-f]{8}:\s*kIO(?:GPU|Accel)CommandBufferCallbackError\w+\)")
IOAF_CODE = re.compile(r"\(IOAF code (?P<num>\d+)\)")
CMDBUF = re.compile(
    r"\[METAL\] Command buffer execution failed:|Execution of the command buffer was aborted"
    r"|Command buffer execution failed"
)
STATUS = re.compile(r"command buffer \d+ failed with status (?P<status>\d+)")
BARE_DETAIL = re.compile(r"^(?:error: )?Insufficient Memory\b")
CHECK_ERROR = re.compile(
    r"gpu::check_error\(MTL::CommandBuffer|com\.Metal\.CompletionQueueDispatch"
)


def cmdbuf(text: str) -> tuple[str, str] | None:
    """(kind, confidence) of a command-buffer failure named on this line, from its code first."""
    code = IOGPU_CODE.search(text)
    if code:
        if code.group("code") in CODE_KINDS:
            return CODE_KINDS[code.group("code")], HIGH
        return "gpu_error", HIGH
    ioaf = IOAF_CODE.search(text)
    if ioaf:
        return NUMBER_KINDS.get(int(ioaf.group("num")), "gpu_error"), HIGH
    if CMDBUF.search(text):
        for words, kind in DETAIL_WORDS:
            if words in text:
                return kind, HIGH
        return "gpu_error", LOW
    if BARE_DETAIL.search(text):
        return "cmdbuf_oom", LOW
    return None


# --- allocator failures --------------------------------------------------------------------

ALLOC_TOO_LARGE = re.compile(
    r"Attempting to allocate \d+ bytes which is greater than the maximum allowed buffer size"
    r"|\bsize \d+ is larger than buffer maximum"
)
RESOURCE_LIMIT = re.compile(r"Resource limit \(\d+\) exceeded")
UNABLE = re.compile(
    r"\[[\w:]*malloc[\w:]*\] Unable to allocate \d+ bytes|\bfailed to allocate (?:\w+ )?buffer\b"
)
CUDA_MALLOC = re.compile(
    r"\b(?:cuda\w*Malloc\w*|cuMemAlloc\w*)(?:\([^)]*\))? failed:\s*(?P<why>[^.\n]*)"
)
# Any other CUDA runtime or driver call that ran out of device memory: MLX's CUDA backend
# reports it as "<call>(<args>) failed: out of memory" (measured on an H200: cudaGraphInstantiate
# while generate_step evaluated the prompt cache).
CUDA_CALL_OOM = re.compile(r"\b(?:cuda|cu)[A-Z]\w*(?:\([^)]*\))? failed:\s*out of memory")
CUDA_OOM = re.compile(r"\bCUDA(?: error)?:? out of memory|cudaErrorMemoryAllocation")


def message_kind(text: str) -> tuple[str, str] | None:
    """(kind, confidence) of the failure an error text names anywhere in ``text``."""
    found = cmdbuf(text)
    if found:
        return found
    if ALLOC_TOO_LARGE.search(text):
        return "alloc_too_large", HIGH
    if RESOURCE_LIMIT.search(text):
        return "resource_limit", HIGH
    if UNABLE.search(text):
        return "unable_to_allocate", HIGH
    cuda = CUDA_MALLOC.search(text)
    if cuda:
        # "failed: out of memory" is an OOM; any other reason is a sticky CUDA error met by
        # an allocation, which does not say whether memory ran out
        return "unable_to_allocate", HIGH if "out of memory" in cuda.group("why") else LOW
    if CUDA_OOM.search(text) or CUDA_CALL_OOM.search(text):
        return "unable_to_allocate", HIGH
    return None


def kind_of(text: str) -> str | None:
    found = message_kind(text)
    return found[0] if found else None


# --- aborts, deaths, panics ----------------------------------------------------------------

LIBCXX_ABORT = re.compile(r"libc\+\+abi: terminating(?: due to uncaught exception)?")
LIBCXX_TYPE = re.compile(r"of type [\w:<>]+:\s*(?P<msg>.*)$")
TERMINATE_GCC = re.compile(r"terminate called after throwing an instance of")
OBJC_ABORT = re.compile(r"Terminating app due to uncaught exception '(?P<exc>\w+)'")
GGML_ASSERT = re.compile(
    r"GGML_ASSERT\((?P<cond1>.*)\) failed|GGML_ASSERT:\s*\S+?:\d+:?\s*(?P<cond2>.*)"
)
KERNEL_PANIC = re.compile(r"^panic\(cpu \d+|^Panicked task\b")
# Metal's API validation and C assert(): "-[...]:1011: failed assertion `why'"; a crash
# report shows only the frames (__assert_rtn, MTLReportFailure)
FAILED_ASSERTION = re.compile(r"failed assertion\s*[`'\"](?P<why>[^`'\"]+)")
ASSERT_FRAME = re.compile(r"\b__assert_rtn\b|\bMTLReportFailure\b")
ABORT_FRAME = re.compile(r"\blibsystem_c\.dylib\]?\s+(?:0x[0-9a-f]+\s+)?abort\b")
SEGV = re.compile(r"Segmentation fault|SIGSEGV|Fatal Python error: Segmentation")
OOM_KILLER = re.compile(
    r"Out of memory: Kill(?:ed)? process|oom-kill(?:er)?\b|invoked oom-killer"
    r"|Memory cgroup out of memory|jetsam|JETSAM|result 'oom-kill'"
)
KILLED = re.compile(r"^Killed(?:: 9)?$|^(?:\S+: )?(?:line \d+: )?\d+ Killed\b|\bSIGKILL\b")
ABORTED_SHELL = re.compile(r"Aborted \(core dumped\)|^Aborted$|Abort trap: 6|SIGABRT")
# shells report a child's death: "zsh: segmentation fault  cmd", "[1]  68916 abort  cmd",
# "Segmentation fault: 11", "Killed: 9", glued to a progress bar or not
SHELL_DEATH = re.compile(
    r"(?:\b(?:zsh|bash|sh|ksh|fish):\s+(?:line \d+:\s+)?(?:\d+\s+)?"
    r"|^\[\d+\][+-]?\s+(?:\d+\s+)?)"
    r"(?P<what>segmentation fault|abort|killed|bus error|illegal hardware instruction)\b"
    r"|\b(?P<what2>Segmentation fault|Abort trap|Killed|Bus error|Illegal instruction): \d+\b",
    re.IGNORECASE,
)
# supervisors and Go's os/exec: "signal: killed", "(exit: signal: abort trap)", launchd's
# "exited due to SIGKILL", supervisord's "terminated by SIGABRT", torch's "terminated with
# signal SIGKILL"
SIGNAL_WORD = re.compile(
    r"\bsignal: (?P<what>killed|aborted|abort trap|segmentation fault|bus error)"
    r"|(?:exited due to|terminated (?:by|with)) (?:signal:? )?(?P<sig>SIG[A-Z]+)"
)
DEATH_WORDS = {
    "segmentation fault": "SIGSEGV",
    "abort": "SIGABRT",
    "aborted": "SIGABRT",
    "abort trap": "SIGABRT",
    "killed": "SIGKILL",
    "bus error": "SIGBUS",
    "illegal hardware instruction": "SIGILL",
    "illegal instruction": "SIGILL",
}

# exit evidence: rc=-6, returncode -11, exited with code 134, exit status 139, status=6/ABRT
EXIT_NUMERIC = re.compile(
    r"(?:\brc|returncode|return code|exit(?:ed)?(?: with)? (?:code|status)|exit code|status)"
    r"\s*[=:]?\s*\(?(?P<code>-?\d+)\)?(?!\s*/)"
)
EXIT_SYSTEMD = re.compile(r"status=(?P<num>\d+)/(?P<name>[A-Z]+)")

# --- Python failures -----------------------------------------------------------------------

TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
THREAD_DEATH = re.compile(r"^Exception in thread (?P<name>.*?):?$")
GENERATION_THREAD = re.compile(r"generat|engine|worker|batch", re.IGNORECASE)
WEDGE = re.compile(r"generation thread died")
PY_EXC_LINE = re.compile(
    r"^(?P<exc>(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)):\s*(?P<msg>.*)$"
)
ALWAYS_FAILURES = ("RuntimeError", "MemoryError")
BENIGN_EXCEPTIONS = frozenset(
    # a client that went away: http.server logs the traceback and keeps serving
    {"BrokenPipeError", "ConnectionResetError", "ConnectionAbortedError", "CancelledError"}
)
LOOP_ERROR = re.compile(
    r"(?:Engine loop error|Error in (?:speculative )?generation(?: thread)?"
    r"|Error during (?:stream )?generation|Error in iterating prediction stream)"
    r"\s*:\s*(?P<msg>\S.*)"
)
CLIENT_ERROR = re.compile(
    # a client's view of a server-side failure: a structured 5xx error body
    r'"error":\s*\{\s*"message":\s*"(?P<msg>(?:[^"\\]|\\.)+)".*?"(?:server_error|internal_error)"'
)
RUNNER = re.compile(
    r"runner (?:process has terminated|failed|terminated)\"?[:\s]+(?:error=\"?)?(?P<msg>.*)"
)
MEMORY_WARNING = re.compile(r"greater than the recommended max working set size")

TRIGGER = re.compile(
    r"abi|terminat|METAL|metal|malloc|alloc|cuda|CUDA|died|kIO|IOAF|IOGPU|command buffer"
    r"|Command buffer|Insufficient|Segmentation|segmentation|SIG[A-Z]{3,4}|Out of memory"
    r"|oom|jetsam|JETSAM|Killed|killed|Abort|abort|\brc\b|status|exit|Exit|returncode"
    r"|return code|Error|error|Exception|Traceback|panic|Panicked|GGML_ASSERT|fault|Fault"
    r"|Bus error|Illegal instruction|Resource limit|check_error|CompletionQueue|working set"
    r"|assert|MTLReportFailure"
)
"""Cheap pre-filter: a line matching none of these cannot start an event."""


def needs_join(text: str) -> bool:
    """A libc++abi or Metal message that a formatter cut before its end."""
    if LIBCXX_ABORT.search(text) or TERMINATE_GCC.search(text):
        return kind_of(text) is None or not is_complete_cmdbuf(text)
    if "[METAL]" in text or "[metal::malloc]" in text or "[malloc]" in text:
        return not is_complete_message(text)
    return False


def is_complete_cmdbuf(text: str) -> bool:
    if not CMDBUF.search(text):
        return kind_of(text) is not None
    return bool(IOGPU_COMPLETE.search(text))


def is_complete_message(text: str) -> bool:
    if CMDBUF.search(text):
        return is_complete_cmdbuf(text)
    if re.search(r"\[metal::malloc\]|\[malloc\]", text):
        return kind_of(text) is not None and bool(re.search(r"(?:bytes|exceeded)\.?", text))
    return False


def signal_name(num: int) -> str | None:
    try:
        return _signal.Signals(num).name
    except ValueError:
        return None


def signal_number(name: str) -> int | None:
    try:
        return int(_signal.Signals[name])
    except KeyError:
        return None


def exit_evidence(text: str) -> tuple[int, str | None] | None:
    """(exit code as printed, or -signal for textual evidence; signal name) if the line has it."""
    systemd = EXIT_SYSTEMD.search(text)
    if systemd:
        num = int(systemd.group("num"))
        if "code=exited" in text:
            return num, None
        return -num, "SIG" + systemd.group("name")
    numeric = EXIT_NUMERIC.search(text)
    if numeric and re.search(r"exit|\brc\b|returncode|return code|died|terminated", text, re.I):
        code = int(numeric.group("code"))
        if code < 0:
            return code, signal_name(-code)
        if 128 < code < 128 + 65:
            return code, signal_name(code - 128)
        return code, None
    return None


def death(text: str) -> str | None:
    """The signal a shell, supervisor or service manager says the process died of."""
    shell = SHELL_DEATH.search(text)
    if shell:
        what = (shell.group("what") or shell.group("what2")).lower()
        return DEATH_WORDS.get(what)
    word = SIGNAL_WORD.search(text)
    if word:
        if word.group("sig"):
            return word.group("sig")
        return DEATH_WORDS.get(word.group("what"))
    return None


LOW_NOTES = {
    "gpu_error": "a Metal command buffer failed, but the log does not carry its error code",
    "cmdbuf_oom": "'Insufficient Memory' appears without a command-buffer error code",
    "unable_to_allocate": "a CUDA allocation failed for a reason other than 'out of memory'",
}


def semantics_of(text: str, kind: str | None) -> str | None:
    """abort / deferred / sync, judged from how the message reached the log."""
    if kind is None:
        return None
    if kind in CMDBUF_KINDS:
        stripped = text.rstrip()
        if PY_EXC_LINE.match(stripped) or "RuntimeError" in stripped or stripped.endswith("."):
            return "deferred"
        if "generation thread died" in stripped:
            return "deferred"
        return None
    if kind in OOM_KINDS:
        return "sync"
    return None


def abort_message(text: str) -> str | None:
    """The exception message an abort line carries ("" if none); None if not an abort line."""
    if TERMINATE_GCC.search(text):
        return text.split("what():", 1)[1].strip() if "what():" in text else ""
    if LIBCXX_ABORT.search(text):
        typed = LIBCXX_TYPE.search(text)
        return typed.group("msg").strip() if typed else ""
    return None


def is_joined_complete(text: str) -> bool:
    if LIBCXX_ABORT.search(text) or TERMINATE_GCC.search(text):
        return kind_of(text) is not None and is_complete_cmdbuf(text)
    return is_complete_message(text)
