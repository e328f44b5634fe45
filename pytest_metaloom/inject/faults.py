"""Fault kinds, the exact MLX error texts, their semantics and the fault-spec grammar.

Pure and import-light on purpose: the harness validates a spec before any server
starts, and the in-server runtime parses the same text, so both sides share one
definition of what a fault is and what MLX would print for it.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pytest_metaloom import units

__all__ = [
    "BACKEND_TEXTS",
    "FAULT_KINDS",
    "FILTER_KEYS",
    "PATHS",
    "SEMANTICS",
    "SITES",
    "SIZE_BASES",
    "VARIANTS",
    "FaultKind",
    "FaultPoint",
    "FaultSpec",
    "FaultSpecError",
    "Term",
    "abort_line",
    "default_semantics",
    "message",
    "parse_size",
    "parse_spec",
]

Family = Literal["allocator", "command_buffer", "control", "hang"]

SEMANTICS: tuple[str, ...] = ("abort", "deferred", "sync")
# Which backend's text a fault carries. ``metal`` is the default everywhere; the CUDA
# variants are the texts MLX's CUDA allocator produces (mlx/backend/cuda/allocator.cpp:
# CHECK_CUDA_ERROR(call) throws "<call> failed: <cudaGetErrorString>", and
# cudaErrorMemoryAllocation reads "out of memory").
VARIANTS: tuple[str, ...] = ("metal", "cuda", "cuda_malloc", "cuda_managed", "cuda_host")
SITES: tuple[str, ...] = ("prefill", "decode", "cache")
PATHS: tuple[str, ...] = ("batched", "sequential")

DEFAULT_RESOURCE_LIMIT = 499000
# Defaults for allocator texts when a spec gives no numbers: a 64 GiB request
# against a 32 GiB maximum buffer (plausible on a large Apple-silicon machine).
DEFAULT_ALLOC_BYTES = 68719476736
DEFAULT_MAX_BUFFER = 34359738368

_CMDBUF_PREFIX = "[METAL] Command buffer execution failed: "
_CUDA_OOM = "failed: out of memory"
_ABORT_PREFIX = "libc++abi: terminating due to uncaught exception of type std::runtime_error: "


@dataclass(frozen=True)
class FaultKind:
    """One failure MLX can produce, with what a graceful server should answer.

    ``is_oom`` is True only for memory exhaustion (allocator kinds and
    ``cmdbuf_oom``). The other command-buffer failures (timeout, hang, victim,
    invalid resource) are not memory exhaustion, so a cache reset is not implied,
    but the GPU could not do the work: the graceful answer is still 503
    "service unavailable". Only ``runtime_error`` (a non-Metal bug) maps to 500.
    """

    name: str
    family: Family
    is_oom: bool
    expected_status: int
    template: str
    params: tuple[str, ...] = ()
    # other backends' texts for the same failure, (variant, template); ``template`` is
    # the ``metal`` variant
    others: tuple[tuple[str, str], ...] = ()

    @property
    def allowed_semantics(self) -> tuple[str, ...]:
        """Command-buffer failures abort or defer by MLX version (``sync``: raised by the
        evaluation that committed the buffer); the rest are synchronous."""
        if self.family == "command_buffer":
            return ("abort", "deferred", "sync")
        return ("sync",)

    @property
    def variants(self) -> dict[str, str]:
        """Backend variant -> text template (``metal`` first, the default)."""
        return {"metal": self.template, **dict(self.others)}

    def template_for(self, variant: str | None) -> str:
        """The template of ``variant`` (None: ``metal``); a clear error if it has none."""
        name = variant or "metal"
        try:
            return self.variants[name]
        except KeyError:
            raise ValueError(
                f"fault kind {self.name!r} has no {name!r} variant; it has "
                f"{', '.join(self.variants)}"
            ) from None


def _cmdbuf(name: str, what: str, code: str, oom: bool) -> FaultKind:
    return FaultKind(name, "command_buffer", oom, 503, f"{_CMDBUF_PREFIX}{what} ({code})")


FAULT_KINDS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        FaultKind(
            "alloc_too_large",
            "allocator",
            True,
            503,
            "[metal::malloc] Attempting to allocate {bytes} bytes which is greater than"
            " the maximum allowed buffer size of {max} bytes.",
            ("bytes", "max"),
        ),
        FaultKind(
            "resource_limit",
            "allocator",
            True,
            503,
            "[metal::malloc] Resource limit ({limit}) exceeded.",
            ("limit",),
        ),
        FaultKind(
            "unable_to_allocate",
            "allocator",
            True,
            503,
            # Metal's allocator and CUDA's (when the driver hands back no pointer) both
            # print this text; the cuda* variants are a failed cudaMalloc* call.
            "[malloc] Unable to allocate {bytes} bytes.",
            ("bytes",),
            (
                ("cuda", f"cudaMallocAsync(&data, size, stream) {_CUDA_OOM}"),
                ("cuda_malloc", f"cudaMalloc(&data, size) {_CUDA_OOM}"),
                ("cuda_managed", f"cudaMallocManaged(&data, size) {_CUDA_OOM}"),
                ("cuda_host", f"cudaMallocHost(&data, size) {_CUDA_OOM}"),
            ),
        ),
        _cmdbuf(
            "cmdbuf_oom",
            "Insufficient Memory",
            "00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory",
            True,
        ),
        _cmdbuf(
            "gpu_timeout",
            "Caused GPU Timeout Error",
            "00000002:kIOGPUCommandBufferCallbackErrorTimeout",
            False,
        ),
        _cmdbuf(
            "gpu_hang",
            "Caused GPU Hang Error",
            "00000003:kIOGPUCommandBufferCallbackErrorHang",
            False,
        ),
        _cmdbuf(
            "gpu_victim",
            "Discarded (victim of GPU error/recovery)",
            "00000005:kIOGPUCommandBufferCallbackErrorInnocentVictim",
            False,
        ),
        _cmdbuf(
            "invalid_resource",
            "Invalid Resource",
            "00000009:kIOGPUCommandBufferCallbackErrorInvalidResource",
            False,
        ),
        FaultKind(
            "runtime_error",
            "control",
            False,
            500,
            "[metaloom] injected non-OOM failure (control case)",
        ),
        FaultKind("hang", "hang", False, 503, ""),
    )
}


def _version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(
            f"cannot read an MLX version from {version!r}; expected something like '0.32.4'"
        )
    return int(m.group(1)), int(m.group(2))


def default_semantics(mlx_version: str) -> str:
    """``abort`` before MLX 0.32 (handler throws on a dispatch thread), ``deferred`` from 0.32."""
    return "abort" if _version_tuple(mlx_version) < (0, 32) else "deferred"


def message(
    kind: str | FaultKind,
    semantics: str | None = None,
    variant: str | None = None,
    **params: int,
) -> str:
    """The exception text MLX would carry for ``kind`` (``what()`` / ``str(RuntimeError)``).

    Command-buffer errors raised in Python (``deferred``, ``sync``; mlx >= 0.32) end
    with ``.`` (MLX PR #3523 stores the text with a trailing dot); the aborting handler
    of mlx <= 0.31 throws the text without it. ``variant`` picks the backend's text.
    """
    fk = _kind(kind)
    template = fk.template_for(variant)
    sem = semantics or fk.allowed_semantics[0]
    if sem not in fk.allowed_semantics:
        raise ValueError(
            f"semantics {sem!r} does not fit fault kind {fk.name!r}; "
            f"use one of {', '.join(fk.allowed_semantics)}"
        )
    unknown = set(params) - set(fk.params)
    if unknown:
        raise ValueError(
            f"fault kind {fk.name!r} takes no parameter(s) {sorted(unknown)}; "
            f"it takes {list(fk.params) or 'none'}"
        )
    values = {"bytes": DEFAULT_ALLOC_BYTES, "max": DEFAULT_MAX_BUFFER}
    values["limit"] = DEFAULT_RESOURCE_LIMIT
    values.update(params)
    text = template.format(**values)
    if fk.family == "command_buffer" and sem in ("deferred", "sync"):
        text += "."
    return text


def _backend_texts() -> dict[str, dict[str, str]]:
    """kind -> variant -> the fixed part of its text (before the first ``{``)."""
    out: dict[str, dict[str, str]] = {}
    for kind in FAULT_KINDS.values():
        if kind.family in ("command_buffer", "allocator"):
            out[kind.name] = {v: t.split("{", 1)[0] for v, t in kind.variants.items()}
    return out


# What a log or an exception carries for each GPU failure, by backend variant: the text
# up to its first number (``metaloom classify`` and patch sets match on these).
BACKEND_TEXTS: dict[str, dict[str, str]] = _backend_texts()


def abort_line(text: str) -> str:
    """The line libc++abi writes to stderr before ``terminate()`` raises SIGABRT."""
    return _ABORT_PREFIX + text


def _kind(kind: str | FaultKind) -> FaultKind:
    if isinstance(kind, FaultKind):
        return kind
    try:
        return FAULT_KINDS[kind]
    except KeyError:
        hint = _suggest(kind, FAULT_KINDS)
        raise ValueError(f"unknown fault kind {kind!r}{hint}") from None


# --------------------------------------------------------------------------- errors


def _suggest(word: str, choices: object) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)  # type: ignore[call-overload]
    return f"; did you mean {close[0]!r}?" if close else ""


class FaultSpecError(ValueError):
    """A fault spec or size that cannot be parsed; the message points at the spot."""

    def __init__(self, problem: str, text: str, pos: int = 0, length: int = 1) -> None:
        self.problem = problem
        self.text = text
        self.pos = max(0, min(pos, len(text)))
        caret = " " * self.pos + "^" * max(1, length)
        super().__init__(f"{problem}\n  {text}\n  {caret}")


# --------------------------------------------------------------------------- sizes

# Sizes have one home, ``pytest_metaloom/units.py`` (the same grammar for fault specs,
# METALOOM_LIMITS, the real-Metal plan and ``metaloom budget``); these wrappers only turn
# its errors into FaultSpecError, which points at the spot in the spec.
SIZE_BASES = units.SIZE_BASES


def parse_size(text: str, baselines: Mapping[str, int]) -> int:
    """Resolve a SIZE expression to bytes against ``baselines`` (active, peak, limit)."""
    try:
        return units.parse_size(text, baselines)
    except units.SizeError as exc:
        raise FaultSpecError(exc.problem, exc.text, exc.pos, exc.length) from None


def _check_size(text: str) -> None:
    try:
        units.check_size(text)
    except units.SizeError as exc:
        raise FaultSpecError(exc.problem, exc.text, exc.pos, exc.length) from None


# --------------------------------------------------------------------------- spec model

FILTER_KEYS: tuple[str, ...] = (
    "site",
    "path",
    "request",
    "wired",
    "memory",
    "nth_eval",
    "after_evals",
    "nth_request",
    "after_requests",
    "after_tokens",
    "seed",
)
_INT_FILTERS = ("nth_eval", "after_evals", "nth_request", "after_requests", "after_tokens", "seed")
_SIZE_FILTERS = ("wired", "memory")
_PARAM_KEYS = ("bytes", "max", "limit")


@dataclass(frozen=True)
class Term:
    """One step of a chain: fire ``action`` (or stay quiet for ``off``) on a hit."""

    action: str
    count: int | None = None
    percent: float | None = None
    semantics: str | None = None
    params: tuple[tuple[str, int], ...] = ()
    variant: str | None = None

    @property
    def kind(self) -> FaultKind | None:
        return None if self.action == "off" else FAULT_KINDS[self.action]

    def resolved_semantics(self, default: str) -> str:
        """The semantics this term fires with, given the version default for command buffers."""
        if self.semantics:
            return self.semantics
        kind = self.kind
        if kind is None:
            return "sync"
        return default if kind.family == "command_buffer" else "sync"

    def to_text(self) -> str:
        out = ""
        if self.percent is not None:
            out += f"{self.percent:g}%"
        if self.count is not None:
            out += f"{self.count}*"
        out += self.action
        args = [a for a in (self.semantics, self.variant) if a]
        args += [f"{k}={v}" for k, v in self.params]
        if args:
            out += "(" + ",".join(args) + ")"
        return out


@dataclass(frozen=True)
class FaultPoint:
    """A chain of terms plus the filters that decide which evaluations are hits."""

    terms: tuple[Term, ...]
    filters: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.filters:
            if k == key:
                return v
        return default

    @property
    def sites(self) -> tuple[str, ...] | None:
        value = self.get("site")
        return tuple(value.split("|")) if value else None

    def int_filter(self, key: str) -> int | None:
        value = self.get(key)
        return int(value) if value is not None else None

    def to_text(self) -> str:
        text = "->".join(t.to_text() for t in self.terms)
        if self.filters:
            text += "@" + ",".join(f"{k}={v}" for k, v in self.filters)
        return text


@dataclass(frozen=True)
class FaultSpec:
    """A parsed fault spec: one or more independent points."""

    points: tuple[FaultPoint, ...]
    text: str = field(default="", compare=False)

    def to_text(self) -> str:
        return ";".join(p.to_text() for p in self.points)


# --------------------------------------------------------------------------- parser

_TERM = re.compile(
    r"^(?:(?P<pct>\d+(?:\.\d+)?)%)?(?:(?P<cnt>\d+)\*)?(?P<act>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:\s*\((?P<args>[^()]*)\))?$"
)
_TERM_HELP = "expected [P%][N*]kind[(args)], e.g. 2*cmdbuf_oom(abort)"


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _split(text: str, start: int, end: int, sep: str) -> list[tuple[int, int]]:
    """Split text[start:end] on ``sep`` and return stripped absolute spans."""
    spans = []
    pos = start
    while True:
        i = text.find(sep, pos, end)
        stop = end if i < 0 else i
        spans.append(_strip_span(text, pos, stop))
        if i < 0:
            return spans
        pos = i + len(sep)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, problem: str, pos: int, length: int = 1) -> FaultSpecError:
        return FaultSpecError(f"invalid fault spec: {problem}", self.text, pos, length)

    def spec(self) -> FaultSpec:
        if not self.text.strip():
            raise self.fail("the spec is empty; " + _TERM_HELP, 0)
        points = [self.point(s, e) for s, e in _split(self.text, 0, len(self.text), ";")]
        return FaultSpec(tuple(points), self.text)

    def point(self, start: int, end: int) -> FaultPoint:
        if start == end:
            raise self.fail("empty fault point (stray ';'?); " + _TERM_HELP, start)
        at = self.text.find("@", start, end)
        chain_end = end if at < 0 else at
        terms = [self.term(s, e) for s, e in _split(self.text, start, chain_end, "->")]
        for i, t in enumerate(terms[:-1]):
            if t.count is None and t.percent is None:
                s, e = _split(self.text, start, chain_end, "->")[i + 1]
                raise self.fail(
                    f"term {terms[i + 1].to_text()!r} is unreachable: the term before it has no "
                    "count and applies forever; give it one, e.g. '2*off->...'",
                    s,
                    e - s,
                )
        filters: list[tuple[str, str]] = []
        if at >= 0:
            for s, e in _split(self.text, at + 1, end, ","):
                key, value = self.filter(s, e)
                if any(k == key for k, _ in filters):
                    raise self.fail(f"filter {key!r} is given twice in one point", s, e - s)
                filters.append((key, value))
        return FaultPoint(tuple(terms), tuple(filters))

    def term(self, start: int, end: int) -> Term:
        raw = self.text[start:end]
        if not raw:
            raise self.fail("empty term (stray '->'?); " + _TERM_HELP, start)
        m = _TERM.match(raw)
        if not m:
            raise self.fail(f"malformed term {raw!r}; {_TERM_HELP}", start, len(raw))
        action = m.group("act")
        act_pos = start + m.start("act")
        if action != "off" and action not in FAULT_KINDS:
            names = [*FAULT_KINDS, "off"]
            raise self.fail(
                f"unknown fault kind {action!r}; expected one of {', '.join(names)}"
                f"{_suggest(action, names)}",
                act_pos,
                len(action),
            )
        percent = float(m.group("pct")) if m.group("pct") else None
        if percent is not None and not 0 < percent <= 100:
            raise self.fail(f"probability {percent:g}% must be in (0, 100]", start, len(raw))
        count = int(m.group("cnt")) if m.group("cnt") else None
        if count == 0:
            raise self.fail("a count must be at least 1 ('0*' never applies)", start, len(raw))
        semantics, variant, params = None, None, []
        if m.group("args") is not None:
            args_start = start + m.start("args")
            for s, e in _split(self.text, args_start, args_start + len(m.group("args")), ","):
                arg = self.text[s:e]
                if "=" in arg:
                    params.append(self.param(action, arg, s))
                elif arg in SEMANTICS:
                    if semantics:
                        raise self.fail("semantics given twice", s, len(arg))
                    semantics = arg
                elif arg in VARIANTS:
                    if variant:
                        raise self.fail("backend variant given twice", s, len(arg))
                    kind = FAULT_KINDS.get(action)
                    if kind is not None and arg not in kind.variants:
                        raise self.fail(
                            f"fault kind {action!r} has no {arg!r} variant; it has "
                            f"{', '.join(kind.variants)}",
                            s,
                            len(arg),
                        )
                    variant = arg
                else:
                    raise self.fail(
                        f"unknown argument {arg!r}; expected a semantics "
                        f"({', '.join(SEMANTICS)}), a backend variant ({', '.join(VARIANTS)}) "
                        f"or key=value ({', '.join(_PARAM_KEYS)})"
                        f"{_suggest(arg, SEMANTICS + VARIANTS)}",
                        s,
                        max(1, len(arg)),
                    )
            if semantics and action != "off":
                allowed = FAULT_KINDS[action].allowed_semantics
                if semantics not in allowed:
                    pos = args_start + m.group("args").find(semantics)
                    raise self.fail(
                        f"semantics {semantics!r} does not fit {action!r} "
                        f"({FAULT_KINDS[action].family} faults are {' or '.join(allowed)})",
                        pos,
                        len(semantics),
                    )
            if action == "off" and (semantics or params or variant):
                raise self.fail("'off' takes no arguments", args_start, len(m.group("args")))
        return Term(action, count, percent, semantics, tuple(params), variant)

    def param(self, action: str, arg: str, pos: int) -> tuple[str, int]:
        key, _, value = (p.strip() for p in arg.partition("="))
        allowed = FAULT_KINDS[action].params if action in FAULT_KINDS else ()
        if key not in allowed:
            raise self.fail(
                f"fault kind {action!r} takes no parameter {key!r}; it takes "
                f"{', '.join(allowed) or 'none'}{_suggest(key, allowed or _PARAM_KEYS)}",
                pos,
                len(key) or 1,
            )
        if not value.isdigit():
            raise self.fail(
                f"parameter {key}={value!r} must be a whole number", pos + arg.find("=") + 1
            )
        return key, int(value)

    def filter(self, start: int, end: int) -> tuple[str, str]:
        raw = self.text[start:end]
        key, eq, value = raw.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise self.fail(
                f"malformed filter {raw!r}; expected key=value with key one of "
                f"{', '.join(FILTER_KEYS)}",
                start,
                max(1, len(raw)),
            )
        if key not in FILTER_KEYS:
            raise self.fail(
                f"unknown filter {key!r}; expected one of {', '.join(FILTER_KEYS)}"
                f"{_suggest(key, FILTER_KEYS)}",
                start,
                len(key),
            )
        vpos = start + raw.find("=") + 1
        while vpos < end and self.text[vpos].isspace():
            vpos += 1
        if not value:
            raise self.fail(f"filter {key!r} has no value", vpos)
        if key == "site":
            offset = 0
            for site in value.split("|"):
                if site not in SITES:
                    raise self.fail(
                        f"unknown site {site!r}; expected one of {', '.join(SITES)}"
                        f"{_suggest(site, SITES)}",
                        vpos + offset,
                        max(1, len(site)),
                    )
                offset += len(site) + 1
        elif key == "path" and value not in PATHS:
            raise self.fail(
                f"unknown path {value!r}; expected one of {', '.join(PATHS)}"
                f"{_suggest(value, PATHS)}",
                vpos,
                len(value),
            )
        elif key == "request" and not re.fullmatch(r"[A-Za-z0-9_.:\-]+", value):
            raise self.fail(
                f"request id {value!r} may use only letters, digits and _.:-", vpos, len(value)
            )
        elif key in _INT_FILTERS:
            if not value.isdigit():
                raise self.fail(f"filter {key!r} needs a whole number, got {value!r}", vpos)
            if key.startswith("nth_") and int(value) < 1:
                raise self.fail(f"filter {key!r} counts from 1", vpos, len(value))
        elif key in _SIZE_FILTERS:
            try:
                _check_size(value)
            except FaultSpecError as exc:
                raise self.fail(f"filter {key!r}: {exc.problem}", vpos, len(value)) from None
        return key, value


def parse_spec(text: str) -> FaultSpec:
    """Parse a fault spec; raise :class:`FaultSpecError` pointing at the first mistake."""
    if not isinstance(text, str):
        raise TypeError(f"a fault spec is a string, got {type(text).__name__}")
    return _Parser(text).spec()


# --------------------------------------------------------------------------- chain state


class ChainState:
    """Runtime state of one point's chain (fail-rs semantics).

    On each hit the terms are tried in order: a used-up term is skipped, a ``P%``
    term that loses its draw passes the hit on to the next term, and the chosen
    term consumes one count. ``off`` consumes without firing. When every term is
    used up the point is off for good.
    """

    def __init__(self, point: FaultPoint) -> None:
        self.point = point
        self.remaining = [t.count for t in point.terms]
        seed = point.int_filter("seed")
        self.rng = random.Random(seed)
        self.hits = 0
        self.fired = 0

    @property
    def exhausted(self) -> bool:
        return all(r == 0 for r in self.remaining)

    def checkpoint(self) -> tuple[Any, ...]:
        """The whole chain state (counts and the ``P%`` draws), for ``rollback``."""
        draws = any(t.percent is not None and t.percent < 100 for t in self.point.terms)
        return (list(self.remaining), self.hits, self.fired, self.rng.getstate() if draws else None)

    def rollback(self, saved: tuple[Any, ...]) -> None:
        """Undo the hits since ``checkpoint``: a held fault fires later, from the same
        state (the same draws, so a seeded chain stays reproducible)."""
        remaining, self.hits, self.fired, rng = saved
        self.remaining = list(remaining)
        if rng is not None:
            self.rng.setstate(rng)

    def hit(self) -> Term | None:
        """Count a hit and return the term that fires (never ``off``), or None."""
        self.hits += 1
        for i, term in enumerate(self.point.terms):
            if self.remaining[i] == 0:
                continue
            if term.percent is not None and term.percent < 100:
                if self.rng.random() * 100 >= term.percent:
                    continue
            if self.remaining[i] is not None:
                self.remaining[i] -= 1
            if term.action == "off":
                return None
            self.fired += 1
            return term
        return None
