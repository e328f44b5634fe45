"""Real Metal mode: no simulation, the real limits lowered until MLX fails for real.

Only meaningful on Apple Silicon. Here the MLX limits are lowered inside the server
(through the injector's ``limits`` control, which arms no fault) and, when the user
explicitly allows it, the system ceiling ``iogpu.wired_limit_mb`` is lowered with
``sudo sysctl`` and restored afterwards, including on Ctrl-C and SIGTERM (both reach
the restore through pytest's teardown and ``atexit``).
"""

from __future__ import annotations

import atexit
import math
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_metaloom.judge.oracle import Outcome

SYSCTL_KEY = "iogpu.wired_limit_mb"


class RealMetalError(RuntimeError):
    pass


def metal_unavailable_reason() -> str | None:
    """None on Apple Silicon; otherwise why real Metal mode cannot run here."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return (
            f"real Metal mode needs Apple Silicon; this is {platform.system()} "
            f"{platform.machine()} (run without --metaloom-real-metal for simulated faults)"
        )
    return None


def _run(argv: Sequence[str], timeout: float = 20.0) -> str:
    if shutil.which(argv[0]) is None:
        raise RealMetalError(f"{argv[0]!r} is not on PATH; it is needed to change {SYSCTL_KEY}")
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RealMetalError(
            f"{' '.join(argv)} failed with exit code {done.returncode}: "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout.strip()


def read_wired_limit_mb() -> int:
    """The current ceiling in MB (0 means the OS default)."""
    value = _run(["sysctl", "-n", SYSCTL_KEY])
    try:
        return int(value.split()[-1])
    except (ValueError, IndexError) as exc:
        raise RealMetalError(f"unexpected answer from sysctl -n {SYSCTL_KEY}: {value!r}") from exc


def set_command(limit_mb: int, *, sudo: bool = True) -> list[str]:
    """The exact command that sets the ceiling (what an operator would type)."""
    if limit_mb < 0:
        raise ValueError(f"{SYSCTL_KEY} must be >= 0 (0 restores the default), got {limit_mb}")
    argv = ["sysctl", f"{SYSCTL_KEY}={int(limit_mb)}"]
    return ["sudo", "-n", *argv] if sudo else argv


class WiredLimit:
    """Lower ``iogpu.wired_limit_mb`` for a while; always put the old value back."""

    def __init__(self, limit_mb: int, *, sudo: bool = True) -> None:
        self.limit_mb = limit_mb
        self.sudo = sudo
        self.previous: int | None = None

    def apply(self) -> WiredLimit:
        self.previous = read_wired_limit_mb()
        atexit.register(self.restore)
        _APPLIED.add(self)
        _run(set_command(self.limit_mb, sudo=self.sudo))
        return self

    def restore(self) -> None:
        if self.previous is None:
            return
        # Forget the old value only once it is back: an interrupted or failed restore
        # stays registered, so session teardown and atexit try again.
        _run(set_command(self.previous, sudo=self.sudo))
        self.previous = None
        atexit.unregister(self.restore)
        _APPLIED.discard(self)

    def __enter__(self) -> WiredLimit:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ---------------------------------------------------------------------- session safety net

_APPLIED: set[WiredLimit] = set()


def restore_all() -> None:
    """Put back every ceiling still lowered (session teardown; Ctrl-C and SIGTERM end there).

    Each restore is tried even if an earlier one fails, so one broken ``sudo`` cannot
    leave another value lowered; the first failure is raised afterwards.
    """
    first: Exception | None = None
    for limit in list(_APPLIED):
        try:
            limit.restore()
        except Exception as exc:  # keep going: the others must still be restored
            first = first or exc
    if first is not None:
        raise first


# ---------------------------------------------------------------------- the real run

DEFAULT_WIRED = "active+2GiB"
DEFAULT_MEMORY = "active+2GiB"
DEFAULT_MAX_TURNS = 24
SYSCTL_HEADROOM = 2 * 2**30
PROBE_PROMPT = "metaloom real-metal probe: the quick brown fox jumps over the lazy dog"


@dataclass(frozen=True)
class RealMetalPlan:
    """How hard to squeeze a real server: the lowered limits and how long to push.

    ``wired``/``memory`` are size expressions resolved inside the server (``active`` is
    the loaded model), so one plan fits any model. ``sysctl_mb`` lowers the system
    ceiling too; leave it None unless the user opted in (``--metaloom-sysctl``).
    """

    wired: str | None = DEFAULT_WIRED
    memory: str | None = DEFAULT_MEMORY
    sysctl_mb: int | None = None
    max_turns: int = DEFAULT_MAX_TURNS
    deadline: float = 60.0
    max_tokens: int = 4
    document_words: int = 120

    def __post_init__(self) -> None:
        from pytest_metaloom.units import SizeError, check_size

        for key in ("wired", "memory"):
            text = getattr(self, key)
            if text is None:
                continue
            try:
                check_size(str(text))
            except SizeError as exc:
                raise ValueError(
                    f"RealMetalPlan.{key}={text!r} is not a size: {exc.problem} "
                    "(e.g. 'active+2GiB', '0.8*limit', '24GiB')"
                ) from None
        if self.sysctl_mb is not None and self.sysctl_mb < 1:
            raise ValueError(
                f"RealMetalPlan.sysctl_mb={self.sysctl_mb} would not lower anything; give a "
                "ceiling in MB (>= 1) or None to leave iogpu.wired_limit_mb alone"
            )
        if self.max_turns < 1:
            raise ValueError(f"RealMetalPlan.max_turns must be >= 1, got {self.max_turns}")
        if self.deadline <= 0:
            raise ValueError(f"RealMetalPlan.deadline must be > 0 seconds, got {self.deadline}")


def sysctl_limit_mb(model: str | Path | None, headroom: int = SYSCTL_HEADROOM) -> int:
    """A ceiling just above the model: weights on disk plus ``headroom`` bytes, in MB.

    Below the weights the server could not even load; just above them, a growing
    multi-turn KV crosses the ceiling soon, which is the seed report's failure.
    """
    weights = 0
    if model is not None and Path(model).is_dir():
        weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    return max(1, math.ceil((weights + headroom) / 2**20))


@dataclass
class RealResult:
    """What one real run saw: the outcome plus the evidence behind it."""

    plan: RealMetalPlan
    outcome: Outcome
    turns: list[int | None] = field(default_factory=list)
    kind: str | None = None
    semantics: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.outcome,
            "reasons": self.outcome.reasons,
            "kind": self.kind,
            "semantics": self.semantics,
            "turns": self.turns,
            "limits": self.limits,
            "facts": self.outcome.facts.to_dict(),
            "timings": self.timings,
        }


def _drive(server: Any, plan: RealMetalPlan) -> tuple[Any, list[int | None]]:
    """The seed report's tool loop until the server fails or ``max_turns`` pass."""
    from pytest_metaloom.judge import workload

    messages = workload.tool_loop_start()
    statuses: list[int | None] = []
    last = None
    for turn in range(plan.max_turns):
        messages = workload.tool_loop_turn(messages, turn, document_words=plan.document_words)
        last = workload.chat(
            server.url,
            messages,
            request_id=workload.new_request_id("real"),
            max_tokens=plan.max_tokens,
            tools=[workload.WEATHER_TOOL],
            deadline=plan.deadline,
        )
        statuses.append(last.status)
        if not last.ok or not server.is_alive():
            break
    return last, statuses


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.05)


def _sequences_at_start(events: list[dict], request_id: str) -> int | None:
    for event in events:
        if event.get("event") == "request_start" and event.get("request_id") == request_id:
            return (event.get("cache") or {}).get("sequences")
    return None


def run_real_scenario(server: Any, plan: RealMetalPlan | None = None) -> RealResult:
    """Lower the real limits, drive the tool loop until MLX fails for real, classify.

    Nothing is simulated: the injector in the server only applies the limits (its
    ``limits`` op arms no fault). On a backend that never fails (the CPU one) the
    honest result is ``not_fired``: "no real failure within N turns".
    """
    from pytest_metaloom.inject.faults import FAULT_KINDS, default_semantics
    from pytest_metaloom.judge import workload
    from pytest_metaloom.judge.oracle import NOT_FIRED, Facts, classify, request_facts
    from pytest_metaloom.matrix.runner import survival_facts
    from pytest_metaloom.tools.classify import classify_text

    plan = plan or RealMetalPlan()
    if getattr(server, "injector", None) is None:
        raise RealMetalError(
            "real Metal mode lowers the limits inside the server, so it needs a server that "
            "metaloom started (not --metaloom-url / an external server)"
        )
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    limits: dict[str, Any] = {}
    if plan.wired is not None or plan.memory is not None:
        limits = server.metal_limits(wired=plan.wired, memory=plan.memory)
    probe = workload.single_turn(PROBE_PROMPT)
    workload.chat(server.url, probe, max_tokens=1, deadline=plan.deadline)
    warm = workload.chat(server.url, probe, max_tokens=1, deadline=plan.deadline)
    pid_before = server.pid
    events_before = len(server.events())
    log_before = len(server.log_text())

    t_drive = time.monotonic()
    ceiling = WiredLimit(plan.sysctl_mb) if plan.sysctl_mb is not None else None
    if ceiling is not None:
        ceiling.apply()
    try:
        affected, turns = _drive(server, plan)
    finally:
        if ceiling is not None:
            ceiling.restore()
    timings["drive"] = time.monotonic() - t_drive

    fired = not (affected.ok and server.is_alive())
    if fired and not server.is_alive():
        _wait(lambda: not server.is_alive(), 5.0)
    elif fired:
        _wait(server.is_alive, 0.5)  # an abort may still be on its way
    found = classify_text(server.log_text()[log_before:])
    kind = found.kind if found.kind in FAULT_KINDS else None
    semantics = found.semantics
    if kind is not None and semantics is None and FAULT_KINDS[kind].family == "command_buffer":
        started = [e for e in server.events() if e.get("event") == "started"]
        semantics = default_semantics(started[-1].get("mlx_version", "0.32") if started else "0.32")
    alive = server.is_alive()
    health_after_fault = workload.health(server.url) if alive else None
    if alive and fired and getattr(server, "guard", False):
        _wait(lambda: workload.health(server.url) == 200, 60.0)

    recovery: list[Any] = []
    cached_after = sequences_after = None
    if alive and fired:
        probe_obs = workload.chat(server.url, probe, max_tokens=1, deadline=plan.deadline)
        recovery.append(probe_obs)
        cached_after = probe_obs.cached_tokens if probe_obs.ok else None
        sequences_after = _sequences_at_start(server.events(events_before), probe_obs.request_id)
        recovery.append(
            workload.chat(
                server.url,
                workload.single_turn("after the real failure"),
                max_tokens=2,
                deadline=plan.deadline,
            )
        )
    fault = FAULT_KINDS[kind] if kind is not None else None
    facts = Facts(
        fault=kind or "real_metal",
        expected_status=fault.expected_status if fault else 503,
        needs_cache_reset=fault.is_oom if fault else True,
        fired=fired,
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
    )


def plan_for(settings: Any, model: str | Path | None) -> RealMetalPlan:
    """The plan a ``--metal-oom --metaloom-real-metal`` session runs for each patch set.

    The system ceiling is touched only with ``--metaloom-sysctl``: it is machine-wide.
    """
    return RealMetalPlan(
        sysctl_mb=sysctl_limit_mb(model) if settings.metaloom_sysctl else None,
        max_turns=DEFAULT_MAX_TURNS,
        deadline=settings.metaloom_deadline,
    )
