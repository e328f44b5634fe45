"""The built-in OOM scenario matrix and the runner that turns one scenario into facts.

A scenario is data (fault, semantics, path, stream, site, workload). The runner
drives a live server through it: warm a probe prompt, arm the fault for one tagged
request, send it (with bystanders), then look at everything a client and the event
log can see: process, status line, stream end, /health, recovery, cache reset.
No pytest here: ``items.py`` turns scenarios into test items.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_metaloom.judge import workload
from pytest_metaloom.judge.oracle import Facts, Outcome, classify, request_facts
from pytest_metaloom.matrix.scenarios import PROBE_PROMPT, Scenario


@dataclass
class ScenarioResult:
    scenario: Scenario
    outcome: Outcome
    events: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""
    restarted_before: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.outcome,
            "reasons": self.outcome.reasons,
            "facts": self.outcome.facts.to_dict(),
            "timings": self.timings,
            "events": self.events[-20:],
        }


class ScenarioRunner:
    """Runs scenarios one after another against one server, restarting it when needed."""

    def __init__(
        self,
        server: Any,
        *,
        deadline: float = 20.0,
        hang_deadline: float = 4.0,
        seed: int = 0,
        cycles: int = 4,
        make_spare: Callable[[], Any] | None = None,
        spares: int = 2,
    ) -> None:
        self.server = server
        self.make_spare = make_spare
        self.spares = spares
        self._pool: list[Future[Any]] = []
        self._executor: ThreadPoolExecutor | None = None
        self.retired: list[Any] = []
        self.deadline = deadline
        self.hang_deadline = hang_deadline
        self.seed = seed
        self.cycles = cycles
        self._ids = itertools.count()
        self._loop: tuple[list[dict], int] = ([], 0)

    def request_id(self, scenario: Scenario) -> str:
        """Ids derive from the seed: the same seed replays the same specs and requests."""
        digest = hashlib.sha1(f"{self.seed}|{scenario.id}|{next(self._ids)}".encode())
        return f"{scenario.fault}-{digest.hexdigest()[:10]}"

    # -- server hygiene ------------------------------------------------------------
    def ensure_clean(self) -> bool:
        """Restart the server if it died, wedged, or still holds an armed fault."""
        self._start_spare()
        healthy = (
            self.server.is_alive()
            and workload.health(self.server.url) == 200
            # /health can lie (a wedged worker behind a supervisor): prove it generates
            and workload.chat(self.server.url, workload.single_turn("ping"), max_tokens=1).ok
        )
        if healthy:
            try:
                self.server.disarm()
            except Exception:
                healthy = False
        if not healthy:
            self._replace_server()
        return not healthy

    # A server killed or wedged by a scenario is replaced by a hot spare that was
    # started (and warmed up) in the background while the scenario ran: restarts then
    # cost a swap instead of a full interpreter + model start.
    def _start_spare(self) -> None:
        """Keep ``spares`` servers starting (or started) in the background."""
        if self.make_spare is None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.spares, thread_name_prefix="metaloom-spare")
        while len(self._pool) < self.spares:
            self._pool.append(self._executor.submit(lambda: self.make_spare().start()))

    def _replace_server(self) -> None:
        if self.make_spare is None:
            self.server.restart()
            return
        self._start_spare()
        ready = [f for f in self._pool if f.done()]
        future = ready[0] if ready else self._pool[0]
        self._pool.remove(future)
        spare = future.result(timeout=300)  # re-raises a spare's start-up error
        old, self.server = self.server, spare
        old.stop()
        self.retired.append(old)
        self._start_spare()

    def close(self) -> None:
        """Stop the spares (the current server belongs to whoever created it)."""
        for future in self._pool:
            try:
                future.result(timeout=300).stop()
            except Exception:  # a spare that failed to start has nothing to stop
                pass
        self._pool = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _guard_restarts(self) -> int | None:
        if not getattr(self.server, "guard", False):
            return None
        from pytest_metaloom.server.process import http_request

        try:
            import json

            _, body = http_request(self.server.url + "/metaloom/status", timeout=3)
            return int(json.loads(body).get("restarts", 0))
        except (OSError, ValueError):
            return None

    # -- one scenario ------------------------------------------------------------------
    def run(self, scenario: Scenario) -> ScenarioResult:
        if scenario.workload == "cycles":
            return self._run_cycles(scenario)
        return self._run_once(scenario)

    def _run_cycles(self, scenario: Scenario) -> ScenarioResult:
        """Fault and recover several times on one server; memory must not creep."""
        single = replace(scenario, workload="single")
        results: list[ScenarioResult] = []
        for _ in range(self.cycles):
            result = self._run_once(single)
            results.append(result)
            if result.outcome.outcome != "graceful":
                break  # a non-graceful cycle already decides; the next would restart
        samples = [r.outcome.facts.memory_after for r in results]
        last = results[-1]
        facts = last.outcome.facts
        if len(results) == self.cycles and all(v is not None for v in samples):
            facts.memory_creep_bytes = max(0, samples[-1] - samples[0])
        timings = {k: sum(r.timings.get(k, 0.0) for r in results) for k in last.timings}
        return ScenarioResult(
            scenario=scenario,
            outcome=classify(facts),
            events=[e for r in results for e in r.events][-40:],
            timings=timings,
            log_tail=last.log_tail,
            restarted_before=results[0].restarted_before,
        )

    def _run_once(self, scenario: Scenario) -> ScenarioResult:
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        restarted = self.ensure_clean()
        timings["prepare"] = time.monotonic() - t0
        server = self.server
        seed = self.seed if scenario.path == "sequential" else None
        deadline = self.hang_deadline if scenario.fault == "hang" else self.deadline

        probe = workload.single_turn(PROBE_PROMPT + f" [{scenario.id}]")
        workload.chat(server.url, probe, max_tokens=1, seed=seed, deadline=self.deadline)
        warm = workload.chat(server.url, probe, max_tokens=1, seed=seed, deadline=self.deadline)
        pid_before = server.pid
        guard_restarts_before = self._guard_restarts()
        events_before = len(server.events())

        rid = self.request_id(scenario)
        server.arm(scenario.spec(rid))
        t_armed = time.monotonic()
        affected, bystanders = self._drive(scenario, rid, seed, deadline)
        timings["drive"] = time.monotonic() - t_armed

        t_fault = time.monotonic()
        fired_events = self._wait_fired(events_before, scenario)
        if scenario.semantics == "abort" and not getattr(server, "guard", False):
            self._wait_exit(5.0)
        alive = server.is_alive()
        status_after = {}
        if alive:
            try:
                status_after = server.disarm()
            except Exception:
                alive = server.is_alive()
        fired = bool(fired_events) or _fired_count(status_after) > 0
        health_after_fault = workload.health(server.url) if alive else None
        if alive and getattr(server, "guard", False):
            self._wait_serving(60.0)  # a restarting worker: the guard answers 503 meanwhile

        # recovery: the probe first (cache reset evidence), then ordinary requests
        recovery: list[workload.Observation] = []
        cached_after = None
        sequences_after = None
        memory_after = None
        if alive:
            probe_obs = workload.chat(
                server.url, probe, max_tokens=1, seed=seed, deadline=min(self.deadline, 10)
            )
            recovery.append(probe_obs)
            cached_after = probe_obs.cached_tokens if probe_obs.ok else None
            start_event = self._start_event(events_before, probe_obs.request_id)
            sequences_after = (start_event.get("cache") or {}).get("sequences")
            memory_after = (start_event.get("memory") or {}).get("active")
            if scenario.workload == "tool_loop":  # the loop goes on: nothing lost silently
                recovery.append(self._next_turn(seed, min(self.deadline, 10)))
            for path_seed in (seed, None if seed is not None else 3):
                recovery.append(
                    workload.chat(
                        server.url,
                        workload.single_turn("after the fault"),
                        max_tokens=2,
                        seed=path_seed,
                        deadline=min(self.deadline, 10),
                    )
                )
        timings["fault_to_verdict"] = time.monotonic() - t_fault
        guard_restarts_after = self._guard_restarts()
        worker_restarted = (
            guard_restarts_before is not None
            and guard_restarts_after is not None
            and guard_restarts_after > guard_restarts_before
        )
        facts = Facts(
            fault=scenario.fault,
            expected_status=scenario.kind.expected_status,
            needs_cache_reset=scenario.kind.is_oom,
            fired=fired,
            worker_restarted=worker_restarted,
            **survival_facts(
                server,
                pid_before=pid_before,
                health_after_fault=health_after_fault,
                recovery=recovery,
            ),
            cache_sequences_after=sequences_after,
            cached_tokens_before=warm.cached_tokens,
            cached_tokens_after=cached_after,
            memory_after=memory_after,
            bystanders=[
                b.status if isinstance(b, workload.Observation) else None for b in bystanders
            ],
            **request_facts(affected),
        )
        timings["total"] = time.monotonic() - t0
        new_events = server.events()[events_before:]
        return ScenarioResult(
            scenario=scenario,
            outcome=classify(facts),
            events=new_events,
            timings=timings,
            log_tail=server.log_tail(30),
            restarted_before=restarted,
        )

    def _drive(
        self, scenario: Scenario, rid: str, seed: int | None, deadline: float
    ) -> tuple[workload.Observation, list[Any]]:
        url = self.server.url
        if scenario.workload == "tool_loop":
            return self._tool_loop(seed, deadline), []

        def affected() -> workload.Observation:
            if scenario.bystanders:
                time.sleep(0.05)  # bystanders are in flight first: the blast radius
            return workload.chat(
                url,
                # unique per request: a prompt cached by an earlier scenario would
                # leave nothing to prefill, and a prefill fault would never fire
                workload.single_turn(f"Explain why GPUs run out of memory ({rid})."),
                request_id=rid,
                stream=scenario.stream,
                max_tokens=8,
                seed=seed,
                deadline=deadline,
            )

        def bystander() -> workload.Observation:
            return workload.chat(
                url,
                workload.single_turn("a bystander question"),
                max_tokens=4,
                seed=seed,
                deadline=deadline,
            )

        results = workload.concurrently(
            [affected, *[bystander] * scenario.bystanders], timeout=deadline + 5
        )
        return results[0], results[1:]

    def _tool_loop(self, seed: int | None, deadline: float, max_turns: int = 8) -> Any:
        """Turns until one fails (the limit was crossed); the conversation is kept so the
        recovery phase can carry on with the next turn, as the seed report's agent would."""
        self._loop = (workload.tool_loop_start(), 0)
        last = None
        for _ in range(max_turns):
            last = self._next_turn(seed, deadline)
            if not last.ok or not self.server.is_alive():
                break
        return last

    def _next_turn(self, seed: int | None, deadline: float) -> workload.Observation:
        messages, turn = self._loop
        messages = workload.tool_loop_turn(messages, turn)
        self._loop = (messages, turn + 1)
        return workload.chat(
            self.server.url,
            messages,
            max_tokens=4,
            seed=seed,
            tools=[workload.WEATHER_TOOL],
            deadline=deadline,
        )

    def _wait_fired(self, since: int, scenario: Scenario, timeout: float = 2.0) -> list[dict]:
        end = time.monotonic() + timeout
        while True:
            fired = [e for e in self.server.events()[since:] if e.get("event") == "fired"]
            if fired or time.monotonic() > end:
                return fired
            time.sleep(0.05)

    def _wait_serving(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while workload.health(self.server.url) != 200 and time.monotonic() < end:
            time.sleep(0.1)

    def _wait_exit(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.server.is_alive() and time.monotonic() < end:
            time.sleep(0.05)

    def _start_event(self, since: int, request_id: str) -> dict:
        for event in self.server.events()[since:]:
            if event.get("event") == "request_start" and event.get("request_id") == request_id:
                return event
        return {}


def survival_facts(
    server: Any,
    *,
    pid_before: int | None,
    health_after_fault: int | None,
    recovery: Sequence[workload.Observation],
) -> dict[str, Any]:
    """Process and recovery fields of :class:`Facts`, read the same way by every runner."""
    alive = server.is_alive()
    return {
        "alive": alive,
        "pid_before": pid_before,
        "pid_after": server.pid,
        "returncode": server.returncode,
        "signal": server.signal,
        "behind_guard": bool(getattr(server, "guard", False)),
        "health_after_fault": health_after_fault,
        "health_after_recovery": workload.health(server.url) if alive else None,
        "recovery_statuses": [o.status for o in recovery],
        "recovery_ok": bool(recovery) and all(o.ok for o in recovery),
        "recovery_hung": any(o.timed_out for o in recovery),
    }


def _fired_count(status: dict) -> int:
    points = status.get("points") or []
    return sum(int(p.get("fired", 0)) for p in points if isinstance(p, dict))
