"""Is a live worker serving, wedged, or beyond proof? Evidence from its own answers, bounded.

``mlx_lm.server`` >= 0.32 rarely dies of a memory failure: the error kills its generation loop
and leaves the process alive, answering ``/health`` 503 and every completion 404 ``generation
thread died``. Liveness says nothing then. A worker is *serving* only when its ``/health`` answers
200 and a one-token completion (the warm-up request) finishes; it is *wedged* when it says so
(a non-200 ``/health``, a completion answered 5xx or with a wedge marker, or closed unanswered).
A check that runs out of time proves nothing either way: *unknown*.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from pytest_metaloom.guard import probe
from pytest_metaloom.guard.evidence import says_wedged

if TYPE_CHECKING:
    from pytest_metaloom.guard.config import GuardConfig
    from pytest_metaloom.guard.supervisor import WorkerRun

SERVING = "serving"
WEDGED = "wedged"
DEAD = "dead"  # exited, or already ended by the guard
UNKNOWN = "unknown"

# How long a closed socket may precede the reaper's word that the process is gone.
DEATH_GRACE = 1.0
# A worker that burns this share of one core is working, not hung (measured over CPU_WINDOW s).
BUSY_SHARE = 0.05
CPU_WINDOW = 0.5  # /proc counts CPU in 10 ms ticks: 0.5 s resolves a 2% share


@dataclass(frozen=True)
class Health:
    state: str
    evidence: str


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:120]


def _said(what: str, answer: probe.Answer, bound: float) -> str:
    if answer.status is not None:
        body = _snippet(answer.body)
        return f"{what} answered {answer.status}" + (f" {body}" if body else "")
    if answer.failure == probe.CLOSED:
        return f"{what} closed without a response"
    return f"{what} did not answer within {bound:g}s"


def _generation(run: WorkerRun, cfg: GuardConfig, bound: float) -> probe.Answer:
    return probe.call(run.port, cfg.warmup_path, method="POST", body=cfg.warmup_body, timeout=bound)


def _failed_generation(answer: probe.Answer) -> bool:
    """A completion that proves the loop is not serving (a timeout proves nothing)."""
    if answer.status is not None:
        return answer.status >= 500 or says_wedged(answer.body)
    return answer.failure == probe.CLOSED


def _ended(run: WorkerRun, cfg: GuardConfig) -> bool:
    """Did the worker exit? Waits for the reaper's record of it (bounded) once it has."""
    if run.died.wait(DEATH_GRACE):
        return True
    if not run.worker.exited():
        return False
    # exited but not reaped yet (a loaded machine, a core dump): the record is coming
    return run.died.wait(cfg.stop_timeout + 5.0)


def check(run: WorkerRun, cfg: GuardConfig, *, bound: float | None = None) -> Health:
    """Serving, wedged, dead or unknown, from the worker's /health and a one-token completion."""
    bound = cfg.probe_timeout if bound is None else bound
    with run.check_lock:  # requests failing together share one set of probes
        if run.died.is_set() or run.retired is not None:
            return Health(DEAD, "the worker has already ended")
        health = probe.call(run.port, cfg.health_path, timeout=bound)
        if health.status is None and health.failure != probe.CLOSED:
            if _ended(run, cfg):
                return Health(DEAD, "the worker exited")
            return Health(UNKNOWN, _said("its /health", health, bound))
        said = _said("its /health", health, bound)
        gen = _generation(run, cfg, bound)
        said_gen = _said("a one-token completion", gen, bound)
        if gen.ok:
            if health.ok:
                return Health(SERVING, f"{said} and a one-token completion succeeded")
            return Health(UNKNOWN, f"{said} but a one-token completion succeeded")
        if _failed_generation(gen) or not health.ok:
            if run.died.is_set() or run.worker.exited():
                _ended(run, cfg)
                return Health(DEAD, "the worker exited")
            return Health(WEDGED, f"{said}; {said_gen}")
        return Health(UNKNOWN, f"{said}; {said_gen}")


def cpu_seconds(pid: int) -> float | None:
    """CPU time used so far by the worker and its children (None once it is gone)."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return float(total)
    except psutil.Error:
        return None


def _cpu_share(pid: int, window: float) -> float | None:
    """Share of one CPU the worker used over ``window`` seconds (None once it is gone)."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    after, spent = cpu_seconds(pid), time.monotonic() - t0
    if before is None or after is None or spent <= 0:
        return None
    return (after - before) / spent


def hang_check(run: WorkerRun, cfg: GuardConfig) -> tuple[str, str] | None:
    """The watchdog's question after ``hang_timeout`` of silence: (kind, evidence) or None.

    None means keep waiting: the worker is visibly working (it burns CPU: a long prefill on a
    loaded machine is slow, not hung), or it still generates. The CPU look comes first and costs
    the worker nothing; only an idle worker is sent probes.
    """
    bound = min(cfg.probe_timeout, cfg.hang_timeout)
    share = _cpu_share(run.worker.pid, min(bound, CPU_WINDOW))
    if share is not None and share >= BUSY_SHARE:
        return None
    health = check(run, cfg, bound=bound)
    if health.state in (SERVING, DEAD):
        return None
    if health.state == WEDGED:
        return "wedged", health.evidence
    used = f"{share:.0%}" if share is not None else "no measurable"
    return "hang", f"{health.evidence}; it used {used} of a CPU before the probes"
