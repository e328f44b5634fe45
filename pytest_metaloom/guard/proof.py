"""Is the worker proven serving? Events decide: a finished completion proves, a failure doubts.

The worker's own ``/health`` is not proof: stock ``mlx_lm.server`` answers it from its HTTP
threads, so a generation loop that is stuck (or dead without saying so) still reads 200. What
proves the loop serves is a completion it finished: the warm-up, a relayed POST answered 2xx in
full, or the one-token completion of a diagnosis. A relay that failed or hung is the opposite
event, a doubt; so is a fresh start without a warm-up.

The guard's ``/health`` answers 200 from the latest proof alone (no probe of the loop), as long
as no doubt came after it and, with a freshness window set, it is younger than the window.
Otherwise it needs a diagnosis first; every ``/health`` that asks while one runs shares its
answer, so a load balancer polling every second costs at most one diagnosis at a time.

Order, not time, relates a completion to a doubt: each doubt starts a new epoch, and a
completion proves only if no doubt came between its start and its end (one that began before a
failure says nothing about the loop after it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    """One diagnosis in progress; callers that arrive meanwhile wait for its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None


class Proof:
    """One worker run's proof state; thread-safe, no I/O."""

    def __init__(self, unproven: str) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._proven_at: float | None = None  # monotonic time of the latest proof
        self._by = ""
        self._doubt = unproven  # why the run is not proven (meaningful while _proven_at is None)
        self._flight: _Flight | None = None

    def token(self) -> int:
        """Take before a completion starts; hand back to ``proven`` once it finished well."""
        return self._epoch

    def proven(self, token: int, by: str) -> bool:
        """A completion started at ``token`` finished; it proves only if no doubt came since."""
        with self._lock:
            if token != self._epoch:
                return False
            self._proven_at = time.monotonic()
            self._by = by
            return True

    def doubt(self, reason: str) -> None:
        """A relay failed or hung: nothing before this proves the loop serves any more."""
        with self._lock:
            self._epoch += 1
            self._proven_at = None
            self._by = ""
            self._doubt = reason

    def unproven(self, window: float) -> str | None:
        """Why ``/health`` must diagnose first; None while a proof stands.

        ``window`` > 0: a proof older than this many seconds no longer stands (an idle worker
        is re-proven at most once per window); 0: a proof stands until the next doubt.
        """
        with self._lock:
            if self._proven_at is None:
                return self._doubt
            if window > 0 and time.monotonic() - self._proven_at > window:
                return f"no completion finished in the last {window:g}s"
            return None

    @property
    def proven_by(self) -> str:
        """What the standing proof was (empty while unproven)."""
        return self._by

    def shared(self, check: Callable[[], T], wait: float) -> T | None:
        """Run ``check`` once for all concurrent callers; None if a caller's ``wait`` ran out.

        The first caller runs it; callers arriving while it runs wait (bounded) for its result
        instead of starting their own probes of the worker.
        """
        with self._lock:
            flight = self._flight
            leader = flight is None
            if flight is None:
                flight = self._flight = _Flight()
        if not leader:
            return flight.result if flight.done.wait(wait) else None
        try:
            flight.result = check()
        finally:
            with self._lock:
                self._flight = None
            flight.done.set()
        return flight.result
