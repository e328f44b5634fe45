"""The runner that turns one scenario into facts for the oracle.

It drives a live server through the scenario: warm a probe prompt, arm the fault for one
tagged request, send it (after its bystanders are shown generating), then look at
everything a client and the event log can see: process, status line, stream end, which
requests were in flight when the fault fired, /health, recovery, cache reset.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_metaloom.judge import workload
from pytest_metaloom.judge.oracle import (
    Facts,
    Outcome,
    bystander_fact,
    classify,
    request_facts,
)
from pytest_metaloom.matrix.bounds import Bounds, cpu_progress
from pytest_metaloom.matrix.scenarios import BYSTANDER_TOKENS, PROBE_PROMPT, Scenario

ANON_PREFIX = "anon-"  # the runtime's name for a request whose id it could not read


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
    """Runs scenarios one after another against one server, restarting it when needed.

    Every wait is a bound derived from the server's own measured latency (``Bounds``):
    a request that makes no progress for the stall bound is hung, whatever the deadline.
    An injected hang is never released before its verdict: the affected request and the
    recovery probes meet the stuck server, then the server is replaced by a spare.
    """

    def __init__(
        self,
        server: Any,
        *,
        deadline: float = 60.0,
        seed: int = 0,
        cycles: int = 4,
        make_spare: Callable[[], Any] | None = None,
        spares: int = 2,
        bounds: Bounds | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        self.server = server
        self.make_spare = make_spare
        self.spares = spares
        self._pool: list[Future[Any]] = []
        self._executor: ThreadPoolExecutor | None = None
        self.retired: list[Any] = []
        self.bounds = bounds or Bounds(cap=deadline)
        self.ready_timeout = ready_timeout
        self.seed = seed
        self.cycles = cycles
        self._ids = itertools.count()
        self._probes = itertools.count()
        self._loop: tuple[list[dict], int] = ([], 0)
        self._watched: tuple[Any, Callable[[], float] | None] | None = None

    @property
    def deadline(self) -> float:
        return self.bounds.deadline(self._guarded)

    @property
    def stall(self) -> float:
        return self.bounds.client_stall(self._guarded)

    @property
    def _guarded(self) -> bool:
        return bool(getattr(self.server, "guard", False))

    def request_id(self, scenario: Scenario) -> str:
        """Ids derive from the seed: the same seed replays the same specs and requests."""
        digest = hashlib.sha1(f"{self.seed}|{scenario.id}|{next(self._ids)}".encode())
        return f"{scenario.fault}-{digest.hexdigest()[:10]}"

    def _chat(self, messages: list[dict], **kwargs: Any) -> workload.Observation:
        kwargs.setdefault("deadline", self.deadline)
        kwargs.setdefault("stall", self.stall)
        kwargs.setdefault("progress", self._progress())
        return workload.chat(self.server, messages, **kwargs)

    def _progress(self) -> Callable[[], float] | None:
        """CPU seconds of the current server's tree (a new server gets a new counter)."""
        server = self.server
        if self._watched is None or self._watched[0] is not server:
            self._watched = (server, cpu_progress(getattr(server, "pid", None)))
        return self._watched[1]

    # -- server hygiene ------------------------------------------------------------
    def ensure_clean(self) -> bool:
        """Restart the server if it died, wedged, or still holds an armed fault.

        The one-token ping that proves generation also measures the latency that every
        bound of the next scenario scales from.
        """
        self._start_spare()
        healthy = (
            self.server.is_alive() and workload.health(self.server.url, timeout=self.stall) == 200
        )
        if healthy:
            # /health can lie (a wedged worker behind a supervisor): prove it generates
            healthy = self.measure()
        if healthy:
            try:
                self.server.disarm()
            except Exception:
                healthy = False
        if not healthy:
            self._replace_server()
            self.measure()
        return not healthy

    def measure(self, samples: int = 1) -> bool:
        """Time one-token completions; True when every one succeeded."""
        ok = True
        for _ in range(samples):
            ping = self._chat(workload.single_turn("ping"), max_tokens=1)
            if ping.ok:
                self.bounds.record(ping.elapsed)
            ok = ok and ping.ok
        return ok

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
        if not self._guarded:
            return None
        from pytest_metaloom.server.process import http_request

        try:
            _, body = http_request(self.server.url + "/metaloom/status", timeout=self.stall)
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
        facts.needs_memory_creep = True  # unmeasured, the row is unproven, never graceful
        if len(results) == self.cycles and all(v is not None for v in samples):
            facts.memory_creep_bytes = max(0, samples[-1] - samples[0])
        timings = {k: sum(r.timings.get(k, 0.0) for r in results) for k in last.timings}
        timings.update({k: v for k, v in last.timings.items() if k.startswith("bound_")})
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
        hang_kind = scenario.kind.family == "hang"

        # unique per run (a cycles scenario repeats its id): its first send must be cold
        probe = workload.single_turn(PROBE_PROMPT + f" [{scenario.id} #{next(self._probes)}]")
        cold = self._chat(probe, max_tokens=1, seed=seed)
        warm = self._chat(probe, max_tokens=1, seed=seed)
        pid_before = server.pid
        guard_restarts_before = self._guard_restarts()
        events_before = len(server.events())

        rid = self.request_id(scenario)
        server.arm(scenario.spec(rid))
        t_armed = time.monotonic()
        affected, bystanders = self._drive(scenario, rid, seed)
        timings["drive"] = time.monotonic() - t_armed

        t_fault = time.monotonic()
        fired_events = self._wait_fired(events_before)
        if scenario.semantics == "abort" and not self._guarded:
            self._wait_exit(self.stall)
        alive = server.is_alive()
        # A hang is not released before its verdict: read the injector's counters
        # without disarming (disarming would let the stuck evaluation go on).
        status_after = self._injector_status(release=not hang_kind) if alive else {}
        alive = server.is_alive()
        fired: bool | None = bool(fired_events) or _fired_count(status_after) > 0
        if not fired and not status_after and alive:
            fired = None  # neither the event log nor the injector could say
        health_after_fault = workload.health(server.url, timeout=self.stall) if alive else None
        restarts_mid = self._guard_restarts()
        restarted = (
            restarts_mid is not None
            and guard_restarts_before is not None
            and restarts_mid > guard_restarts_before
        )
        if alive and self._guarded and (restarted or health_after_fault != 200):
            # the guard restarted the worker, or is about to (its /health says 503 while the
            # worker is dead, wedged or restarting; an abort lands moments after the
            # evaluation returned, so the restart count may not have moved yet): recovery is
            # judged once a worker serves again, bounded by the ready timeout
            self._wait_serving(self.ready_timeout)

        # recovery: the probe first (cache reset evidence), then ordinary requests; the
        # first one that hangs ends the phase (the server is stuck, more would only wait)
        recovery: list[workload.Observation] = []
        cached_after = sequences_after = memory_after = None
        if alive:
            probe_obs = self._chat(probe, max_tokens=1, seed=seed)
            recovery.append(probe_obs)
            cached_after = probe_obs.cached_tokens if probe_obs.ok else None
            start_event = self._start_event(events_before, probe_obs.request_id)
            sequences_after = self._cache_low_water(events_before, probe_obs.request_id)
            memory_after = (start_event.get("memory") or {}).get("active")
            followers: list[Callable[[], workload.Observation]] = []
            if scenario.workload == "tool_loop":  # the loop goes on: nothing lost silently
                followers.append(lambda: self._next_turn(seed))
            for path_seed in (seed, None if seed is not None else 3):
                followers.append(
                    lambda s=path_seed: self._chat(
                        workload.single_turn("after the fault"), max_tokens=2, seed=s
                    )
                )
            for follow in followers:
                if recovery[-1].timed_out:
                    break
                recovery.append(follow())
        timings["fault_to_verdict"] = time.monotonic() - t_fault
        raised = [e for e in server.events()[events_before:] if e.get("event") == "raised"]
        guard_restarts_after = self._guard_restarts()
        worker_restarted = None
        if guard_restarts_before is not None and guard_restarts_after is not None:
            worker_restarted = guard_restarts_after > guard_restarts_before
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
                health_timeout=self.stall,
            ),
            cache_sequences_after=sequences_after,
            cached_tokens_cold=cold.cached_tokens if cold.ok else None,
            cached_tokens_before=warm.cached_tokens if warm.ok else None,
            cached_tokens_after=cached_after,
            memory_after=memory_after,
            bystanders=[
                bystander_fact(b, affected, scenario.kind.expected_status) for _, b in bystanders
            ],
            bystanders_in_flight=[_in_flight(fired_events + raised, bid) for bid, _ in bystanders],
            **request_facts(affected),
        )
        timings["total"] = time.monotonic() - t0
        timings.update({f"bound_{k}": v for k, v in self.bounds.to_dict().items() if v})
        new_events = server.events()[events_before:]
        result = ScenarioResult(
            scenario=scenario,
            outcome=classify(facts),
            events=new_events,
            timings=timings,
            log_tail=server.log_tail(30),
            restarted_before=restarted,
        )
        stuck = getattr(affected, "timed_out", False) or any(o.timed_out for o in recovery)
        if stuck or hang_kind:
            # the verdict is in: only now release the hang, then replace the stuck server
            self._injector_status(release=True)
            if stuck and server.is_alive():
                self._replace_server()
        return result

    def _injector_status(self, *, release: bool) -> dict:
        """The injector's per-point counters: ``disarm`` (releases hangs) or ``status``."""
        injector = getattr(self.server, "injector", None)
        try:
            if release:
                return self.server.disarm()
            return injector.status() if injector is not None else {}
        except Exception:  # the server died meanwhile: the event log still says
            return {}

    def _drive(
        self, scenario: Scenario, rid: str, seed: int | None
    ) -> tuple[Any, list[tuple[str, Any]]]:
        """The affected request and ``(request id, observation)`` per bystander.

        Ordered by evidence, not by sleeps. Each bystander streams a long answer, and the
        affected request is sent once every bystander has streamed a token (it is
        generating); for a fault after the affected stream started, the other way round
        (``Scenario.affected_first``), the runtime holding the fault until the last
        bystander joined. After the affected request's answer each bystander is watched
        until it streams one more token (it went on after the fault: the client ends it,
        ``served``), ends by itself (an error, a cut) or makes no progress for the stall
        bound (``hang``). Whether a bystander was in flight when the fault fired is read
        afterwards from the fault's event, never assumed.
        """
        if scenario.workload == "tool_loop":
            return self._tool_loop(seed), []
        ids = [f"{rid}-by{n}" for n in range(1, scenario.bystanders + 1)]
        taps = {bid: workload.Tap() for bid in ids}
        first = workload.Tap() if scenario.affected_first else None

        def bystander(bid: str) -> workload.Observation:
            if first is not None:
                first.wait(_any_token, self.stall)  # the affected stream started (bounded)
            return self._chat(
                workload.single_turn("a bystander question, answered at length"),
                request_id=bid,
                stream=True,
                max_tokens=BYSTANDER_TOKENS,
                seed=seed,
                tap=taps[bid],
            )

        def affected() -> workload.Observation:
            if first is None:
                for tap in taps.values():
                    tap.wait(_any_token, self.stall)  # generating (or over), bounded
            try:
                return self._chat(
                    # unique per request: a prompt cached by an earlier scenario would
                    # leave nothing to prefill, and a prefill fault would never fire
                    workload.single_turn(f"Explain why GPUs run out of memory ({rid})."),
                    request_id=rid,
                    stream=scenario.stream,
                    # first, it must still be generating when the bystanders join
                    max_tokens=8 if first is None else BYSTANDER_TOKENS,
                    seed=seed,
                    tap=first,
                )
            finally:
                self._settle(taps.values())

        calls = [affected, *[lambda b=bid: bystander(b) for bid in ids]]
        # each request is bounded by its own deadline (one side waits at most a stall
        # bound for the other first); the join adds a margin on top
        results = workload.concurrently(calls, timeout=2 * self.stall + self.deadline + 5)
        return results[0], list(zip(ids, results[1:], strict=True))

    def _settle(self, taps: Any) -> None:
        """After the affected answer: one more token per bystander, or its end, or a stall."""
        for tap in taps:
            mark = sum(1 for e in tap.events if workload.token_event(e))

            def went_on(events: list[workload.SseEvent], mark: int = mark) -> bool:
                if any(workload.error_sse(e) for e in events):
                    return False  # an error came: wait for the stream to end by itself
                return sum(1 for e in events if workload.token_event(e)) > mark

            progressed = tap.wait(went_on, self.stall)
            if not tap.closed:
                tap.end(stalled=not progressed)

    def _tool_loop(self, seed: int | None, max_turns: int = 8) -> Any:
        """Turns until one fails (the limit was crossed); the conversation is kept so the
        recovery phase can carry on with the next turn, as the seed report's agent would."""
        self._loop = (workload.tool_loop_start(), 0)
        last = None
        for _ in range(max_turns):
            last = self._next_turn(seed)
            if not last.ok or not self.server.is_alive():
                break
        return last

    def _next_turn(self, seed: int | None) -> workload.Observation:
        messages, turn = self._loop
        messages = workload.tool_loop_turn(messages, turn)
        self._loop = (messages, turn + 1)
        return self._chat(messages, max_tokens=4, seed=seed, tools=[workload.WEATHER_TOOL])

    def _wait_fired(self, since: int) -> list[dict]:
        """The fired event is written before the failure is reported, so it is normally
        there already; the wait only covers the log write racing the HTTP answer."""
        end = time.monotonic() + self.stall
        while True:
            fired = [e for e in self.server.events()[since:] if e.get("event") == "fired"]
            if fired or time.monotonic() > end:
                return fired
            time.sleep(0.05)

    def _wait_serving(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while workload.health(self.server.url, timeout=self.stall) != 200:
            if time.monotonic() >= end:
                return
            time.sleep(0.1)

    def _wait_exit(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.server.is_alive() and time.monotonic() < end:
            time.sleep(0.05)

    def _cache_low_water(self, since: int, probe_id: str) -> int | None:
        """Fewest prompt-cache sequences any cache event showed from the fault to the
        probe. A bystander may refill the cache after the reset, so the count at the
        probe alone would blame the reset for a later insert; an emptied cache shows as 0.
        """
        counts: list[int] = []
        after_fault = False
        for event in self.server.events()[since:]:
            name = event.get("event")
            after_fault = after_fault or name in ("fired", "raised")
            cache = event.get("cache") if after_fault else None
            if isinstance(cache, dict) and isinstance(cache.get("sequences"), int):
                counts.append(cache["sequences"])
            if name == "request_start" and event.get("request_id") == probe_id:
                break
        return min(counts) if counts else None

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
    health_timeout: float = 5.0,
) -> dict[str, Any]:
    """Process and recovery fields of :class:`Facts`, read the same way by every runner.

    No recovery request means no recovery evidence (``None``), never "recovered".
    """
    alive = server.is_alive()
    return {
        "alive": alive,
        "pid_before": pid_before,
        "pid_after": server.pid,
        "returncode": server.returncode,
        "signal": server.signal,
        "behind_guard": bool(getattr(server, "guard", False)),
        "health_after_fault": health_after_fault,
        "health_after_recovery": (
            workload.health(server.url, timeout=health_timeout) if alive else None
        ),
        "recovery_statuses": [o.status for o in recovery],
        "recovery_ok": all(o.ok for o in recovery) if recovery else None,
        "recovery_hung": any(o.timed_out for o in recovery) if recovery else None,
    }


def _any_token(events: list[workload.SseEvent]) -> bool:
    return any(workload.token_event(e) for e in events)


def _in_flight(fault_events: Sequence[dict], request_id: str) -> bool | None:
    """Whether ``request_id`` was being served when the fault fired (or surfaced).

    The runtime writes the ids it was serving into each ``fired`` and ``raised`` event;
    without such an event (or one that carries no ids) nobody can say (``None``). A server
    that keeps the request header from mlx-lm's code (vllm-mlx, rapid-mlx, ...) names only
    the armed request; every other one it serves is ``anon-N``, which may be this one: an id
    absent from a list that holds anonymous requests is unknown too, not "not in flight".
    """
    listed = [e["request_ids"] for e in fault_events if isinstance(e.get("request_ids"), list)]
    if not listed:
        return None
    if any(request_id in ids for ids in listed):
        return True
    if any(str(other).startswith(ANON_PREFIX) for ids in listed for other in ids):
        return None
    return False


def _fired_count(status: dict) -> int:
    points = status.get("points") or []
    return sum(int(p.get("fired", 0)) for p in points if isinstance(p, dict))
