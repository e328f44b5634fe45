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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_metaloom.options import TURN_WORDS, default

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
    """Put back every ceiling this process still has lowered: the safety net of a dying
    process or a script. A pytest session restores only its own ceilings
    (``backends.DeviceSession``); an inner pytester session must not restore the outer's.

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
    max_turns: int = default("metaloom_max_turns")
    deadline: float = 60.0
    max_tokens: int = 4
    document_words: int = TURN_WORDS["metal"]

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


class MetalPressure:
    """MLX's own limits inside the server, and optionally ``iogpu.wired_limit_mb``."""

    name = "metal"
    hold_through_recovery = False  # the machine-wide ceiling goes back as soon as it can

    def __init__(
        self,
        wired: str | None,
        memory: str | None,
        sysctl_mb: int | None,
        *,
        ceilings: set[WiredLimit] | None = None,
    ) -> None:
        self.wired = wired
        self.memory = memory
        self.sysctl_mb = sysctl_mb
        self.ceiling: Any = None
        self.ceilings = ceilings
        """The session's set of lowered ceilings: a ceiling stays in it until it is back,
        so the session's teardown restores it should this run be interrupted."""

    def prepare(self, server: Any) -> dict[str, Any]:
        if self.wired is None and self.memory is None:
            return {}
        return server.metal_limits(wired=self.wired, memory=self.memory)

    def squeeze(self) -> dict[str, Any]:
        if self.sysctl_mb is None:
            return {}
        self.ceiling = WiredLimit(self.sysctl_mb)
        if self.ceilings is not None:
            self.ceilings.add(self.ceiling)
        self.ceiling.apply()
        return {"sysctl_mb": self.sysctl_mb}

    def relax(self) -> None:
        if self.ceiling is not None:
            self.ceiling.restore()
            if self.ceilings is not None:
                self.ceilings.discard(self.ceiling)
            self.ceiling = None

    def tighten(self) -> dict[str, Any]:
        return {}

    def settle(self) -> dict[str, Any]:
        return {}


def run_real_scenario(
    server: Any, plan: RealMetalPlan | None = None, *, ceilings: set[WiredLimit] | None = None
) -> Any:
    """Lower the real limits, drive the tool loop until MLX fails for real, classify.

    The Metal face of :func:`pytest_metaloom.matrix.realdevice.run_real_device`: the
    same drive and judge, with MLX's limits (and, opted in, the system ceiling) as the
    squeeze. Nothing is simulated: the injector only applies the limits. On a backend
    that never fails (the CPU one) the honest result is ``not_fired``. ``ceilings``: the
    session's set of lowered ceilings (see :class:`MetalPressure`).
    """
    from pytest_metaloom.matrix import realdevice

    plan = plan or RealMetalPlan()
    if getattr(server, "injector", None) is None:
        raise RealMetalError(
            "real Metal mode lowers the limits inside the server, so it needs a server that "
            "metaloom started (not --metaloom-url / an external server)"
        )
    device_plan = realdevice.RealDevicePlan(
        turn_words=plan.document_words,
        max_turns=plan.max_turns,
        max_tokens=plan.max_tokens,
        deadline=plan.deadline,
    )
    pressure = MetalPressure(plan.wired, plan.memory, plan.sysctl_mb, ceilings=ceilings)
    result = realdevice.run_real_device(server, device_plan, pressure)
    result.plan = plan
    return result


def plan_for(settings: Any, model: str | Path | None) -> RealMetalPlan:
    """The plan a ``--metal-oom --metaloom-real-metal`` session runs for each patch set.

    The system ceiling is touched only with ``--metaloom-sysctl``: it is machine-wide.
    """
    from pytest_metaloom.matrix.realdevice import max_turns

    return RealMetalPlan(
        sysctl_mb=sysctl_limit_mb(model) if settings.metaloom_sysctl else None,
        max_turns=max_turns(settings),
        deadline=settings.metaloom_deadline,
    )
