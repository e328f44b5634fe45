"""Request bounds scaled from a server's measured latency, not hard-coded seconds.

A verdict must not depend on how busy the machine is: every bound a scenario waits on
(how long a request may go without a byte before it counts as hung, how long recovery
may take, the guard's hang timeout) is a multiple of the latency the server itself
showed for a one-token completion moments before, never below a floor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_STALL_FLOOR = 2.0  # seconds: the smallest no-progress bound
DEFAULT_STALL_MULTIPLIER = 20.0  # x the worst recent one-token latency
# The guard sees only bytes, and a cold prefill of a long conversation (a tool-loop turn
# after a cache reset) sends none for many seconds while its one-token probe queues
# behind it: its hang timeout gets four stall bounds before it kills a silent worker.
GUARD_HANG_FACTOR = 4.0  # the guard's hang timeout, in stall bounds
GUARD_SLACK = 3.0  # behind the guard the client waits this many guard hang timeouts


@dataclass
class Bounds:
    """The worst of the last few one-token latencies, and the bounds derived from it."""

    floor: float = DEFAULT_STALL_FLOOR
    multiplier: float = DEFAULT_STALL_MULTIPLIER
    cap: float = 60.0  # the longest any single request may take (--metaloom-deadline)
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=5))

    def __post_init__(self) -> None:
        if self.floor <= 0 or self.multiplier <= 0 or self.cap <= 0:
            raise ValueError(
                f"stall floor ({self.floor}), multiplier ({self.multiplier}) and deadline "
                f"({self.cap}) must all be > 0; fix --metaloom-stall-floor, "
                "--metaloom-stall-multiplier or --metaloom-deadline"
            )

    def record(self, seconds: float) -> None:
        """One measured one-token completion (a successful one: failures measure nothing)."""
        self.samples.append(seconds)

    @property
    def latency(self) -> float | None:
        return max(self.samples) if self.samples else None

    @property
    def stall(self) -> float:
        """Seconds without a byte after which a request counts as hung."""
        measured = self.multiplier * self.latency if self.latency is not None else 0.0
        return min(max(self.cap, self.floor), max(self.floor, measured))

    @property
    def guard_hang(self) -> float:
        """The guard's hang timeout (``GUARD_HANG_FACTOR`` stall bounds)."""
        return self.stall * GUARD_HANG_FACTOR

    def client_stall(self, guard: bool) -> float:
        """Behind the guard the client waits for the guard to notice, probe and answer."""
        return self.guard_hang * GUARD_SLACK if guard else self.stall

    def deadline(self, guard: bool) -> float:
        """The whole-request bound: the cap, never shorter than the stall bound."""
        return max(self.cap, self.client_stall(guard))

    def to_dict(self) -> dict[str, float | None]:
        return {"latency": self.latency, "stall": self.stall, "guard_hang": self.guard_hang}


def cpu_progress(pid: int | None) -> Callable[[], float] | None:
    """A counter of CPU seconds used by process ``pid`` and its descendants.

    A server that computes (a long prefill sends no byte for seconds) burns CPU; one
    stuck in an evaluation that never returns does not. None when there is no pid to
    watch (a server metaloom did not start).
    """
    if pid is None:
        return None
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return None

    def total() -> float:
        seconds = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            seconds += times.user + times.system
        return seconds

    return total
