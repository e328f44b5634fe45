"""Real-device mode: no simulation; memory made scarce until MLX's allocator fails by itself.

One driver, one judge, two ways to make memory scarce (the backend layer):

- **Metal** (Apple Silicon): lower MLX's limits inside the server and, when the user
  opted in, the system ceiling ``iogpu.wired_limit_mb`` (``realmetal.py``).
- **CUDA** (MLX's CUDA backend): MLX does not enforce ``mx.set_memory_limit`` there
  (measured), so a helper process holds all but ``headroom`` bytes of the device
  (``server/headroom.py``), the way another program on a user's box would.

Then the seed report's tool loop grows the conversation turn by turn until a turn
fails (``site="prefill"``), or one long generation runs while the helper takes the rest
of the memory (``site="decode"``), and the same oracle as the simulated matrix judges.
``RealDevicePlan.simulate`` swaps the real squeeze for an injected fault on the same
workload: that is how the fidelity bench compares the two.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_metaloom.judge.oracle import Outcome
from pytest_metaloom.options import TURN_WORDS, default
from pytest_metaloom.units import parse_size

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_HEADROOM = parse_size(default("metaloom_headroom"))
DEFAULT_DECODE_HEADROOM = 64 * MiB
PROBE_PROMPT = "metaloom real-device probe: the quick brown fox jumps over the lazy dog"
OOM_MARKERS = ("out of memory", "unable to allocate", "insufficient memory", "resource limit")


class RealDeviceError(RuntimeError):
    """Real-device mode cannot run as asked (the message names the cause and the fix)."""


# ---------------------------------------------------------------------- which device


@functools.lru_cache(maxsize=1)
def device_backend() -> str:
    """``metal``, ``cuda`` or ``cpu``: what MLX would run the server on here.

    CUDA is asked in a child process (bounded), so the harness itself never creates a
    GPU context or imports MLX.
    """
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "metal"
    code = "import mlx.core as mx; print('cuda' if mx.cuda.is_available() else 'cpu')"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if done.returncode == 0 and done.stdout.strip() == "cuda" else "cpu"


def unavailable_reason() -> str | None:
    """None where a real device is here; otherwise why real-device mode cannot run."""
    backend = device_backend()
    if backend in ("metal", "cuda"):
        return None
    return (
        "real-device mode needs a GPU MLX can use: Apple Silicon (Metal) or an NVIDIA GPU "
        f"with mlx[cuda13]; this is {platform.system()} {platform.machine()} with MLX's "
        f"{backend} backend (run without --metaloom-real-device for simulated faults)"
    )


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RealDevicePlan:
    """What to drive and how hard to squeeze.

    ``site``: ``prefill`` grows a tool-loop conversation by ``turn_words`` words a turn
    until a turn fails; ``decode`` sends one long prompt (``decode_context_turns`` turns)
    asking for ``decode_tokens`` tokens and takes the memory away once generation runs.
    ``simulate``: a fault spec with ``{rid}`` for the request it targets; when given,
    nothing is squeezed and the injector fails that request instead (turn
    ``simulate_turn`` of the loop).
    """

    path: str = "batched"
    stream: bool = False
    site: str = "prefill"
    headroom: int = DEFAULT_HEADROOM
    decode_headroom: int = DEFAULT_DECODE_HEADROOM
    turn_words: int = TURN_WORDS["metal"]
    max_turns: int = default("metaloom_max_turns")
    max_tokens: int = 4
    decode_tokens: int = 4096
    decode_context_turns: int = 1
    deadline: float = 60.0
    simulate: str | None = None
    simulate_turn: int = 0

    def __post_init__(self) -> None:
        if self.path not in ("batched", "sequential"):
            raise ValueError(
                f"RealDevicePlan.path must be batched or sequential, not {self.path!r}"
            )
        if self.site not in ("prefill", "decode"):
            raise ValueError(f"RealDevicePlan.site must be prefill or decode, not {self.site!r}")
        for name in ("turn_words", "max_turns", "max_tokens", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RealDevicePlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.headroom < 0 or self.decode_headroom < 0:
            raise ValueError("RealDevicePlan headroom must be >= 0 bytes")
        if self.deadline <= 0:
            raise ValueError(f"RealDevicePlan.deadline must be > 0 seconds, got {self.deadline}")
        if self.simulate is not None and "{rid}" not in self.simulate:
            raise ValueError(
                f"RealDevicePlan.simulate={self.simulate!r} must name its request as {{rid}}, "
                "e.g. '1*unable_to_allocate@path=batched,site=prefill,request={rid}'"
            )

    @property
    def seed(self) -> int | None:
        """A request with ``seed`` is served by the sequential path (``_serve_single``)."""
        return 0 if self.path == "sequential" else None


# ---------------------------------------------------------------------- backend layer


class Pressure:
    """How memory is made scarce. The base class squeezes nothing (simulated runs)."""

    name = "none"
    hold_through_recovery = True

    def prepare(self, server: Any) -> dict[str, Any]:
        """Before the warm-up (Metal lowers MLX's limits here)."""
        return {}

    def squeeze(self) -> dict[str, Any]:
        return {}

    def tighten(self) -> dict[str, Any]:
        """Decode runs: take what is left, now that generation is under way."""
        return {}

    def settle(self) -> dict[str, Any]:
        """After the failure: stop taking more (recovery is judged at the plan's headroom)."""
        return {}

    def relax(self) -> None:
        """Give everything back; must be safe to call twice."""


class CudaPressure(Pressure):
    """A headroom helper holds all but ``plan.headroom`` bytes while the drive runs."""

    name = "cuda"

    def __init__(self, helper: Any, plan: RealDevicePlan) -> None:
        self.helper = helper
        self.plan = plan

    def squeeze(self) -> dict[str, Any]:
        self.helper.start()
        return self.helper.hold(self.plan.headroom)

    def tighten(self) -> dict[str, Any]:
        return self.helper.hold(self.plan.decode_headroom, follow=True)

    def settle(self) -> dict[str, Any]:
        # a neighbour that kept taking every freed byte would starve any restart (the
        # guard's new worker could not even load): back to the plan's headroom
        return self.helper.hold(self.plan.headroom) if self.helper.is_alive() else {}

    def relax(self) -> None:
        if self.helper.is_alive():
            self.helper.release()


# ---------------------------------------------------------------------- the result


@dataclass
class RealResult:
    """What one run saw: the outcome plus the evidence behind it."""

    plan: Any
    outcome: Outcome
    turns: list[int | None] = field(default_factory=list)
    kind: str | None = None
    semantics: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""
    error_text: str | None = None
    where: str | None = None
    site: str | None = None
    pressure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.outcome,
            "reasons": self.outcome.reasons,
            "kind": self.kind,
            "semantics": self.semantics,
            "turns": self.turns,
            "limits": self.limits,
            "error_text": self.error_text,
            "where": self.where,
            "site": self.site,
            "pressure": self.pressure,
            "facts": self.outcome.facts.to_dict(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


# ---------------------------------------------------------------------- reading the log

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def failure_in_log(text: str) -> tuple[str | None, str | None, str | None]:
    """(error line, innermost mlx_lm frame, site) of the last memory failure in a log.

    The site uses the injector's names: an evaluation of the prompt cache's state
    (``mx.eval([c.state for c in ...])`` in ``PromptProcessingBatch.prompt`` or in the
    prefill loop of ``generate_step``, where the real CUDA failures were measured) is
    ``cache``; other prompt processing is ``prefill``; a generation step is ``decode``.
    """
    lines = text.splitlines()
    error_at = None
    for index in range(len(lines) - 1, -1, -1):
        low = lines[index].lower()
        if any(marker in low for marker in OOM_MARKERS) and "error" in low:
            error_at = index
            break
    if error_at is None:
        return None, None, None
    frames: list[tuple[Any, str]] = []  # mlx_lm frames, innermost first, with their code
    for index in range(error_at, max(-1, error_at - 80), -1):
        match = _FRAME.search(lines[index])
        if match and "mlx_lm" in match["file"]:
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            frames.append((match, code))
    error = lines[error_at].strip()
    if not frames:
        return error, None, None
    frame, code = frames[0]
    caller = frames[1][0]["func"] if len(frames) > 1 else ""
    where = f"{Path(frame['file']).name}:{frame['line']} in {frame['func']}: {code}"
    func = frame["func"]
    if "c.state for c in" in code:
        site = "cache"
    elif func in ("prompt", "_prefill") or (func == "_step" and caller == "__init__"):
        site = "prefill"  # the batched step over the last prompt token is prefill too
    elif func == "generate_step" and code in ("mx.async_eval(y, logprobs)", "mx.eval(y)"):
        site = "prefill"
    elif func in ("_step", "next", "generate_step", "_next"):
        site = "decode"
    else:
        site = "other"
    return error, where, site


# ---------------------------------------------------------------------- driving


def _chat(server: Any, plan: RealDevicePlan, messages: list[dict], rid: str, **kw: Any) -> Any:
    from pytest_metaloom.judge import workload

    return workload.chat(
        server,
        messages,
        request_id=rid,
        stream=plan.stream,
        seed=plan.seed,
        tools=[workload.WEATHER_TOOL],
        deadline=plan.deadline,
        **kw,
    )


def _fresh_start() -> list[dict]:
    """The tool loop's opening, unique to this run: a conversation an earlier run left in
    the prompt cache would need no prefill, so nothing would be allocated or fail."""
    import uuid

    from pytest_metaloom.judge import workload

    messages = workload.tool_loop_start()
    first = dict(messages[0])
    first["content"] = f"{first['content']} (conversation {uuid.uuid4().hex[:12]})"
    return [first, *messages[1:]]


def _drive_prefill(server: Any, plan: RealDevicePlan) -> tuple[Any, list[int | None]]:
    """The seed report's tool loop until a turn fails or ``max_turns`` pass."""
    from pytest_metaloom.judge import workload

    messages = _fresh_start()
    statuses: list[int | None] = []
    last = None
    for turn in range(plan.max_turns):
        messages = workload.tool_loop_turn(messages, turn, document_words=plan.turn_words)
        rid = workload.new_request_id("real")
        if plan.simulate is not None and turn == plan.simulate_turn:
            server.arm(plan.simulate.format(rid=rid))
        last = _chat(server, plan, messages, rid, max_tokens=plan.max_tokens)
        statuses.append(last.status)
        if not last.ok or not server.is_alive():
            break
    return last, statuses


def _context(plan: RealDevicePlan, offset: int) -> list[dict]:
    from pytest_metaloom.judge import workload

    messages = _fresh_start()
    for turn in range(plan.decode_context_turns):
        messages = workload.tool_loop_turn(messages, offset + turn, document_words=plan.turn_words)
    return messages


def _drive_decode(
    server: Any, plan: RealDevicePlan, pressure: Pressure
) -> tuple[Any, list[int | None], dict[str, Any]]:
    """One long generation; the memory goes once its prefill is over.

    The prefill time is measured first on a context of the same length (other words,
    so nothing is reused from the prompt cache), then the helper takes the rest of
    the memory that long after the request was sent.
    """
    from pytest_metaloom.judge import workload

    t = time.monotonic()
    calibrate = _chat(
        server, plan, _context(plan, 1000), workload.new_request_id("cal"), max_tokens=1
    )
    prefill = time.monotonic() - t
    statuses: list[int | None] = [calibrate.status]
    rid = workload.new_request_id("real")
    if plan.simulate is not None:
        server.arm(plan.simulate.format(rid=rid))
    box: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: box.setdefault(
            "obs", _chat(server, plan, _context(plan, 2000), rid, max_tokens=plan.decode_tokens)
        ),
        daemon=True,
    )
    sender.start()
    info: dict[str, Any] = {"prefill_s": round(prefill, 3)}
    sender.join(prefill * 1.5 + 0.5)
    if sender.is_alive():
        info["tighten"] = pressure.tighten()
    sender.join(plan.deadline + 5)
    obs = box.get("obs")
    if obs is None:  # the thread is bounded by the request deadline; this is a bug guard
        raise RealDeviceError("the decode request did not return within its deadline")
    statuses.append(obs.status)
    return obs, statuses, info


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.05)


def _sequences_at_start(events: list[dict], request_id: str) -> int | None:
    for event in events:
        if event.get("event") == "request_start" and event.get("request_id") == request_id:
            return (event.get("cache") or {}).get("sequences")
    return None


def guard_restarts(server: Any) -> int | None:
    """The guard's restart count (None without a guard or when it does not say)."""
    if not getattr(server, "guard", False):
        return None
    from pytest_metaloom.server.http import request as http_request

    try:
        _, body = http_request(server.url + "/metaloom/status", timeout=3)
        return int(json.loads(body).get("restarts", 0))
    except (OSError, ValueError):
        return None


def run_real_device(
    server: Any, plan: RealDevicePlan | None = None, pressure: Pressure | None = None
) -> RealResult:
    """Squeeze, drive until the allocator fails by itself, judge with the oracle.

    On a device that never fails (MLX's CPU backend) the honest result is
    ``not_fired``: "no real failure within N turns".
    """
    from pytest_metaloom.inject.faults import FAULT_KINDS, default_semantics
    from pytest_metaloom.judge import workload
    from pytest_metaloom.judge.oracle import NOT_FIRED, Facts, classify, request_facts
    from pytest_metaloom.matrix.runner import survival_facts
    from pytest_metaloom.tools.classify import classify_text

    plan = plan or RealDevicePlan()
    pressure = pressure or Pressure()
    if getattr(server, "injector", None) is None:
        raise RealDeviceError(
            "real-device mode watches the server through metaloom's injector, so it needs a "
            "server that metaloom started (not --metaloom-url / an external server)"
        )
    timings: dict[str, float] = {}
    squeeze_info: dict[str, Any] = {"backend": pressure.name}
    t0 = time.monotonic()
    limits = pressure.prepare(server)
    probe = workload.single_turn(PROBE_PROMPT)
    seed = plan.seed
    workload.chat(server, probe, max_tokens=1, seed=seed, deadline=plan.deadline)
    warm = workload.chat(server, probe, max_tokens=1, seed=seed, deadline=plan.deadline)
    pid_before = server.pid
    restarts_before = guard_restarts(server)
    events_before = len(server.events())
    log_before = len(server.log_text())

    t_drive = time.monotonic()
    try:
        squeeze_info["squeeze"] = pressure.squeeze()
        try:
            if plan.site == "decode":
                affected, turns, info = _drive_decode(server, plan, pressure)
                squeeze_info.update(info)
                squeeze_info["settle"] = pressure.settle()
            else:
                affected, turns = _drive_prefill(server, plan)
        finally:
            if not pressure.hold_through_recovery:
                pressure.relax()
        timings["drive"] = time.monotonic() - t_drive

        fired = not (affected.ok and server.is_alive())
        if fired and not server.is_alive():
            _wait(lambda: not server.is_alive(), 5.0)
        elif fired:
            _wait(server.is_alive, 0.5)  # an abort may still be on its way
        log = server.log_text()[log_before:]
        found = classify_text(log)
        kind = found.kind if found.kind in FAULT_KINDS else None
        semantics = found.semantics
        if kind is not None and semantics is None and FAULT_KINDS[kind].family == "command_buffer":
            started = [e for e in server.events() if e.get("event") == "started"]
            version = started[-1].get("mlx_version", "0.32") if started else "0.32"
            semantics = default_semantics(version)
        error_text, where, site = failure_in_log(log)
        fired_events = [e for e in server.events(events_before) if e.get("event") == "fired"]
        if fired_events:  # a simulated run: the injector says where it fired
            site = fired_events[-1].get("site") or site
            where = fired_events[-1].get("where") or where
        alive = server.is_alive()
        health_after_fault = workload.health(server.url) if alive else None
        if alive and fired and getattr(server, "guard", False):
            _wait(lambda: workload.health(server.url) == 200, 60.0)

        recovery: list[Any] = []
        cached_after = sequences_after = None
        if alive and fired:
            probe_obs = workload.chat(
                server, probe, max_tokens=1, seed=seed, deadline=plan.deadline
            )
            recovery.append(probe_obs)
            cached_after = probe_obs.cached_tokens if probe_obs.ok else None
            sequences_after = _sequences_at_start(
                server.events(events_before), probe_obs.request_id
            )
            recovery.append(
                workload.chat(
                    server,
                    workload.single_turn("after the real failure"),
                    max_tokens=2,
                    seed=seed,
                    deadline=plan.deadline,
                )
            )
        restarts_after = guard_restarts(server)
    finally:
        pressure.relax()
    if plan.simulate is not None and server.is_alive():
        with contextlib.suppress(Exception):
            server.disarm()
    fault = FAULT_KINDS[kind] if kind is not None else None
    if plan.simulate is None and fault is not None and not fault.is_oom:
        # the squeeze made this failure: a non-memory error in the log (e.g. CUDA's
        # "illegal memory access" after the allocator failed) is a consequence, and the
        # answer owed is still the out-of-memory one
        fault = None
    oom = fault.is_oom if fault else True
    facts = Facts(
        fault=kind or "real_device",
        expected_status=fault.expected_status if fault else 503,
        needs_cache_reset=oom,
        fired=fired,
        worker_restarted=(
            restarts_before is not None
            and restarts_after is not None
            and restarts_after > restarts_before
        ),
        **survival_facts(
            server,
            pid_before=pid_before,
            health_after_fault=health_after_fault,
            recovery=recovery,
        ),
        cache_sequences_after=sequences_after,
        cached_tokens_before=warm.cached_tokens,
        cached_tokens_after=cached_after,
        **request_facts(affected),
    )
    outcome = classify(facts)
    if outcome.outcome == NOT_FIRED:
        outcome = Outcome(NOT_FIRED, [f"no real failure within {len(turns)} turns"], facts)
    timings["total"] = time.monotonic() - t0
    return RealResult(
        plan=plan,
        outcome=outcome,
        turns=turns,
        kind=kind,
        semantics=semantics,
        limits=limits,
        events=server.events(events_before),
        timings=timings,
        log_tail=server.log_tail(30),
        error_text=error_text,
        where=where,
        site=site,
        pressure=squeeze_info,
    )


# ---------------------------------------------------------------------- session settings


def max_turns(settings: Any) -> int:
    """--metaloom-max-turns, checked where a plan is made, so a bad value names the option."""
    turns = settings.metaloom_max_turns
    if turns < 1:
        raise RealDeviceError(
            f"--metaloom-max-turns={turns} would drive no turn at all; give 1 or more "
            "(the tool loop stops at the first real failure anyway)"
        )
    return turns
