"""The supervisor: keeps one worker serving, names why it died, restarts it within a budget.

A single long-lived thread spawns every worker. That matters on Linux: ``PR_SET_PDEATHSIG`` fires
when the *spawning thread* exits, so short-lived restart threads would kill healthy workers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_metaloom.guard import probe
from pytest_metaloom.guard.causes import Cause, classify_exit, forced_cause, signal_name
from pytest_metaloom.guard.config import GuardConfig
from pytest_metaloom.guard.proof import Proof
from pytest_metaloom.guard.worker import WorkerProcess, free_port, worker_argv
from pytest_metaloom.server import ports

STARTING = "starting"
SERVING = "serving"
RESTARTING = "restarting"
FAILED = "failed"
STOPPING = "stopping"
STOPPED = "stopped"

# Readiness poll interval: a refused connect to loopback costs microseconds, and every interval of
# slack here is added to each restart's time-to-serving.
READY_POLL = 0.02


class WorkerRun:
    """One incarnation of the worker; request handlers hold on to the run they were sent to."""

    def __init__(self, worker: WorkerProcess, port: int) -> None:
        self.worker = worker
        self.port = port
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.died = threading.Event()
        self.died_at: float | None = None
        self.cause: Cause | None = None
        self._forced: Cause | None = None
        self._lock = threading.Lock()
        # one diagnosis at a time: requests failing together share the probes' answers
        self.check_lock = threading.Lock()
        # proven serving only by a finished completion (the warm-up, a relayed one, a probe)
        self.proof = Proof("no completion has finished since the worker started")
        # the answer the guard proved for this run's failure (``failures.Reply``): every
        # request the same failure ends gets it, not a word that depends on who came last
        self.failure_reply: Any = None

    @property
    def retired(self) -> Cause | None:
        """The guard's own reason for ending this run, once it chose to."""
        return self._forced

    def log_mark(self) -> int:
        """Where the worker's stderr ends now: what it writes after this concerns later work."""
        return self.worker.stderr_size()

    def log_since(self, mark: int) -> str:
        """What the worker wrote to stderr after ``mark`` (bounded)."""
        return self.worker.stderr_since(mark)

    def force_kill(self, cause: Cause) -> bool:
        """Kill this run for a reason the guard chose; only the first caller's reason sticks."""
        with self._lock:
            if self._forced is not None or self.died.is_set():
                return False
            self._forced = cause
        self.worker.kill()
        return True


def log_to_stderr(message: str) -> None:
    print(f"metaloom-guard: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Owns the worker lifecycle; thread-safe accessors for the proxy and the status endpoint."""

    def __init__(self, config: GuardConfig, log: Callable[[str], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.log = log or (lambda m: None if config.quiet else log_to_stderr(m))
        self._cond = threading.Condition()
        self._state = STOPPED
        self._run: WorkerRun | None = None
        self._restarts = 0
        self._restart_times: deque[float] = deque()
        self._last_cause: Cause | None = None
        self._failed_reason = ""
        self._next_attempt_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.time()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="metaloom-guard-")
            self.log_dir = Path(self._tmp.name)
        else:
            self.log_dir = Path(config.log_dir)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawned = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("supervisor already started; create a new Guard to restart it")
            self._state = STARTING
        self._started_at = time.time()
        self._thread = threading.Thread(target=self._loop, name="metaloom-guard-supervisor")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop restarting, SIGTERM the worker group, SIGKILL after ``stop_timeout``."""
        self._stop.set()
        with self._cond:
            if self._state != STOPPED:
                self._state = STOPPING
            run = self._run
            self._cond.notify_all()
        if run is not None and not run.died.is_set():
            run.worker.terminate_tree(self.config.stop_timeout)
        if self._thread is not None:
            self._thread.join(self.config.stop_timeout + 10.0)
        with self._cond:
            self._state = STOPPED
            self._cond.notify_all()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                run = self._spawn()
                if run is None:
                    return
                ready = self._wait_ready(run)
                if ready:
                    with self._cond:
                        if self._stop.is_set():
                            break
                        run.ready_at = time.time()
                        self._state = SERVING
                        self._cond.notify_all()
                    up = run.ready_at - run.started_at
                    self.log(f"worker pid={run.worker.pid} serving on port {run.port} ({up:.2f}s)")
                elif not run.died.is_set() and run.worker.is_alive() and not self._stop.is_set():
                    run.force_kill(
                        forced_cause(
                            "not_ready",
                            f"not ready within {self.config.ready_timeout:g}s",
                        )
                    )
                rc = run.worker.wait()
                self._record_death(run, rc)
                if self._stop.is_set():
                    break
                if not self._schedule_restart():
                    return
        finally:
            run = self._run
            if run is not None and run.worker.is_alive():
                run.worker.terminate_tree(self.config.stop_timeout)

    def _spawn(self) -> WorkerRun | None:
        if self._run is not None:  # the previous worker is gone: give its port back
            ports.release_port(self._run.port)
        port = free_port()
        argv = worker_argv(self.config.worker_cmd, port)
        try:
            worker = WorkerProcess(
                argv, log_dir=self.log_dir, env=self.config.env, index=self._spawned
            )
        except OSError as exc:
            cause = forced_cause("spawn_failed", str(exc))
            with self._cond:
                self._last_cause = cause
                self._state = FAILED
                self._failed_reason = f"cannot start worker: {exc}"
                self._cond.notify_all()
            self.log(self._failed_reason)
            return None
        self._spawned += 1
        run = WorkerRun(worker, port)
        with self._cond:
            self._run = run
            if self._state not in (STOPPING, STOPPED):
                self._state = STARTING if self._restarts == 0 else RESTARTING
            self._cond.notify_all()
        self.log(f"started worker pid={worker.pid} on port {port}: {' '.join(argv)}")
        return run

    def _wait_ready(self, run: WorkerRun) -> bool:
        """Health 200, then (optionally) one warm-up completion, within ``ready_timeout``."""
        cfg = self.config
        deadline = time.monotonic() + cfg.ready_timeout
        while True:
            if self._stop.is_set() or not run.worker.is_alive():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if probe.request(run.port, cfg.health_path, timeout=min(2.0, left)) == 200:
                break
            time.sleep(min(READY_POLL, max(0.0, deadline - time.monotonic())))
        if not cfg.warmup:
            return True
        while True:
            token = run.proof.token()
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set() or not run.worker.is_alive():
                return False
            status = probe.request(
                run.port, cfg.warmup_path, method="POST", body=cfg.warmup_body, timeout=left
            )
            if status == 200:
                run.proof.proven(token, "the warm-up completion")
                return True
            if status is not None and status < 500:
                # A client error will not fix itself: say so instead of looping until timeout.
                self.log(
                    f"warm-up {cfg.warmup_path} answered {status}; fix --warmup-path/--warmup-body "
                    "or pass --no-warmup"
                )
                return False
            time.sleep(READY_POLL)

    def _record_death(self, run: WorkerRun, rc: int) -> None:
        cause = run._forced
        if cause is not None:
            cause = Cause(
                cause.kind, rc, cause.signal or signal_name(rc), cause.line, cause.time, True
            )
        else:
            cause = classify_exit(rc, run.worker.stderr_tail())
        with self._cond:
            run.cause = cause
            run.died_at = time.time()
            self._last_cause = cause
            if self._state == SERVING:
                self._state = RESTARTING
            self._cond.notify_all()
        run.died.set()
        stopping = self._stop.is_set() and run._forced is None
        if not stopping:
            detail = f" ({cause.line})" if cause.line else ""
            self.log(f"worker pid={run.worker.pid} exited rc={rc} cause={cause.kind}{detail}")

    def _schedule_restart(self) -> bool:
        """Apply the restart cap and the backoff; False once the guard gave up (state failed)."""
        cfg = self.config
        now = time.monotonic()
        window = self._restart_times
        while window and now - window[0] > cfg.restart_window:
            window.popleft()
        if len(window) >= cfg.max_restarts:
            with self._cond:
                self._state = FAILED
                self._failed_reason = (
                    f"restart cap reached: {len(window)} restarts in {cfg.restart_window:g}s "
                    f"(--max-restarts {cfg.max_restarts})"
                )
                self._cond.notify_all()
            self.log(f"{self._failed_reason}; not restarting, answering 503")
            return False
        window.append(now)
        n = len(window)
        delay = 0.0 if n == 1 else min(cfg.backoff_max, cfg.backoff * 2 ** (n - 2))
        with self._cond:
            self._restarts += 1
            self._state = RESTARTING
            self._next_attempt_at = time.monotonic() + delay
            self._cond.notify_all()
        self.log(f"restarting in {delay:.2f}s ({n}/{cfg.max_restarts} in {cfg.restart_window:g}s)")
        if delay > 0 and self._stop.wait(delay):
            return False
        return True

    # -- what the proxy asks ----------------------------------------------------------------

    def acquire(self, timeout: float) -> WorkerRun | None:
        """The serving run, waiting up to ``timeout`` for one; None if none comes in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                run = self._run
                if (
                    self._state == SERVING
                    and run is not None
                    and not run.died.is_set()
                    and run.retired is None
                ):
                    return run
                if self._state in (FAILED, STOPPING, STOPPED):
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def note_dead(self, run: WorkerRun) -> None:
        """A handler saw the worker's socket die: stop routing there before the reaper notices."""
        with self._cond:
            if self._run is run and self._state == SERVING and not run.worker.is_alive():
                self._state = RESTARTING
                self._cond.notify_all()

    def retire(self, run: WorkerRun, cause: Cause) -> bool:
        """End a live run for ``cause`` (wedged, recycled): stop routing to it, then kill it.

        Requests that arrive meanwhile wait for the next worker (within the queue timeout) or
        get 503; the supervisor restarts as for any death. True for the first caller only.
        """
        with self._cond:
            if run.retired is not None or run.died.is_set():
                return False
            if self._run is run and self._state == SERVING:
                self._state = RESTARTING
            self._last_cause = cause
            self._cond.notify_all()
        if not run.force_kill(cause):
            return False
        self.log(f"worker pid={run.worker.pid} {cause.kind}: {cause.line}; replacing it")
        return True

    @property
    def state(self) -> str:
        return self._state

    def unavailable_reason(self) -> tuple[str, str, int | None]:
        """(code, message, retry-after seconds or None) for a request that finds no worker."""
        with self._cond:
            state, cause = self._state, self._last_cause
            reason, next_at = self._failed_reason, self._next_attempt_at
        if state == FAILED:
            msg = reason
            if cause is not None:
                msg += f"; last cause: {cause.describe()}"
            return (cause.kind if cause else "failed"), msg, None
        if state in (STOPPING, STOPPED):
            return "stopping", "guard is shutting down", None
        wait = max(1, int((next_at or 0) - time.monotonic() + 1.999)) if next_at else 1
        if cause is not None:
            return cause.kind, f"worker restarting after: {cause.describe()}", wait
        return "starting", "worker is starting", wait

    def status(self) -> dict[str, Any]:
        """The body of ``GET /metaloom/status``."""
        with self._cond:
            run, cause = self._run, self._last_cause
            body: dict[str, Any] = {
                "state": self._state,
                "restarts": self._restarts,
                "restarts_in_window": len(self._restart_times),
                "max_restarts": self.config.max_restarts,
                "restart_window": self.config.restart_window,
                "last_cause": cause.as_dict() if cause else None,
                "failed_reason": self._failed_reason or None,
                "guard_pid": os.getpid(),
                "guard_uptime": round(time.time() - self._started_at, 3),
            }
        alive = run is not None and not run.died.is_set()
        body["worker_pid"] = run.worker.pid if alive and run else None
        body["worker_port"] = run.port if alive and run else None
        body["worker_uptime"] = round(time.time() - run.started_at, 3) if alive and run else None
        body["worker_log"] = str(run.worker.stderr_path) if run else None
        if cause is not None:
            body["last_cause"]["message"] = cause.describe()
        return body
