"""Facts -> outcome class. Pure: no server, no HTTP, no pytest.

The oracle never trusts the server's word where the client's observation exists: the
status line comes first, then the body shape, then the stream's end; the cache reset
must be shown twice (the injector's prompt-cache event AND a warm prompt answering
cold). The worst class that applies wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OUTCOMES = (
    "aborted",
    "hang",
    "wedged",
    "request_lost",
    "wrong_status",
    "no_cache_reset",
    "graceful",
)
NOT_FIRED = "not_fired"
SEVERITY = {name: rank for rank, name in enumerate(OUTCOMES)}
MEMORY_CREEP_LIMIT = 1 << 20  # bytes over all cycles; the tiny model's KV is ~256 B/token


@dataclass
class Facts:
    """What was observed around one injected fault (each field observable from outside)."""

    fault: str
    expected_status: int = 503
    needs_cache_reset: bool = True
    fired: bool = True
    # process
    alive: bool = True
    pid_before: int | None = None
    pid_after: int | None = None
    returncode: int | None = None
    signal: str | None = None
    behind_guard: bool = False
    worker_restarted: bool = False
    # the affected request
    stream: bool = False
    status: int | None = None
    complete: bool = False
    got_bytes: bool = False
    timed_out: bool = False
    structured_error: bool = False
    stream_started: bool = False
    sse_error_event: bool = False
    sse_done: bool = False
    ttfb: float | None = None
    # after the fault
    health_after_fault: int | None = None
    health_after_recovery: int | None = None
    recovery_statuses: list[int | None] = field(default_factory=list)
    recovery_ok: bool = True
    recovery_hung: bool = False
    # cache reset
    cache_sequences_after: int | None = None
    cached_tokens_before: int | None = None
    cached_tokens_after: int | None = None
    # blast radius
    bystanders: list[int | None] = field(default_factory=list)
    # memory: active bytes at the first request after recovery, and the creep over
    # repeated fault/recover cycles (None when not measured)
    memory_after: int | None = None
    memory_creep_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    outcome: str
    reasons: list[str]
    facts: Facts

    @property
    def graceful(self) -> bool:
        return self.outcome == "graceful"

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reasons": self.reasons, "facts": self.facts.to_dict()}


def is_structured_error(payload: Any) -> bool:
    """``{"error": {"message": str, "type" or "code": ...}}``, the OpenAI-style shape."""
    if not isinstance(payload, dict):
        return False
    error = payload.get("error")
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error.get("type") or error.get("code"))
    )


def _process_class(f: Facts) -> list[tuple[str, str]]:
    found = []
    if not f.alive:
        how = f.signal or (f"exit code {f.returncode}" if f.returncode is not None else "gone")
        found.append(("aborted", f"the server process died ({how})"))
    elif f.pid_before is not None and f.pid_after is not None and f.pid_before != f.pid_after:
        if not f.behind_guard:
            found.append(("aborted", f"the server pid changed {f.pid_before} -> {f.pid_after}"))
    return found


def _request_class(f: Facts) -> list[tuple[str, str]]:
    found = []
    got_content = (
        f.stream_started or f.sse_error_event or f.sse_done or (f.got_bytes and not f.stream)
    )
    if f.timed_out and not got_content:
        found.append(("hang", "the affected request got no answer before the deadline"))
        return found
    if f.status is None:
        found.append(("request_lost", "the affected request got no status line"))
        return found
    if f.stream and f.status == 200:
        if not f.stream_started and f.sse_error_event and f.sse_done:
            found.append(
                ("wrong_status", f"nothing was streamed yet, so it should be {f.expected_status}")
            )
        elif f.sse_error_event and f.sse_done:
            pass  # a stream that had started ended properly with an error event
        elif not f.sse_done:
            found.append(
                ("request_lost", "the stream ended with neither an error event nor [DONE]")
            )
        else:
            found.append(("wrong_status", "the stream ended with [DONE] but no error event"))
        return found
    if f.timed_out or not f.complete:
        found.append(("request_lost", f"the {f.status} response was cut before its end"))
    elif f.status != f.expected_status:
        found.append(
            ("wrong_status", f"answered {f.status}, expected {f.expected_status} for {f.fault}")
        )
    elif not f.structured_error:
        found.append(("wrong_status", f"{f.status} without a structured JSON error body"))
    return found


def _health_class(f: Facts) -> list[tuple[str, str]]:
    found = []
    if not f.alive:
        return found
    if f.recovery_hung:
        found.append(("wedged", "a request after the fault hung"))
    if not f.recovery_ok:
        statuses = ", ".join(str(s) for s in f.recovery_statuses)
        found.append(("wedged", f"requests after the fault failed ({statuses})"))
    if f.health_after_recovery is not None and f.health_after_recovery != 200:
        found.append(("wedged", f"/health answers {f.health_after_recovery} after recovery"))
    elif f.health_after_recovery == 200 and not f.recovery_ok:
        found.append(("wedged", "/health says 200 while requests fail (a lying health check)"))
    return found


def _cache_class(f: Facts) -> list[tuple[str, str]]:
    if not f.needs_cache_reset or not f.alive:
        return []
    found = []
    if f.worker_restarted:
        return []  # a fresh worker has an empty cache by construction
    if f.cache_sequences_after:
        found.append(
            ("no_cache_reset", f"the prompt cache still holds {f.cache_sequences_after} sequences")
        )
    if f.memory_creep_bytes is not None and f.memory_creep_bytes > MEMORY_CREEP_LIMIT:
        found.append(
            (
                "no_cache_reset",
                f"active memory crept by {f.memory_creep_bytes} bytes over repeated "
                "fault/recover cycles: the reset does not release memory",
            )
        )
    if f.cached_tokens_after:
        found.append(
            (
                "no_cache_reset",
                f"a prompt warm before the fault still reports {f.cached_tokens_after} cached "
                "tokens after it",
            )
        )
    return found


def classify(facts: Facts) -> Outcome:
    """Assign the worst outcome class that the facts support."""
    if not facts.fired and facts.alive:
        return Outcome(NOT_FIRED, ["the armed fault never fired: the test proved nothing"], facts)
    found = _process_class(facts)
    if not facts.fired:
        found.append(("aborted", "the process died although the armed fault never fired"))
    found += _request_class(facts) + _health_class(facts) + _cache_class(facts)
    if not found:
        return Outcome("graceful", ["survived, answered as expected, cache reset"], facts)
    worst = min(found, key=lambda item: SEVERITY[item[0]])[0]
    return Outcome(worst, [reason for _, reason in found], facts)


# -- assertion helpers for downstream tests ------------------------------------------


class NotGraceful(AssertionError):
    pass


def _fail(outcome: Outcome, what: str, context: str = "") -> None:
    lines = [f"{what}: outcome {outcome.outcome}", *(f"  - {r}" for r in outcome.reasons)]
    lines.append("facts:")
    lines += [f"  {k} = {v!r}" for k, v in outcome.facts.to_dict().items()]
    if context:
        lines += ["", context]
    raise NotGraceful("\n".join(lines))


def assert_graceful(outcome: Outcome, context: str = "") -> None:
    """Fail with the facts (and any context: events, log tail) unless graceful."""
    if not outcome.graceful:
        _fail(outcome, "the server did not handle the fault gracefully", context)


def assert_survived(outcome: Outcome, context: str = "") -> None:
    if not outcome.facts.alive:
        _fail(outcome, "the server process died", context)


def assert_status(outcome: Outcome, context: str = "") -> None:
    if any(cls in ("hang", "request_lost", "wrong_status") for cls in _classes(outcome)):
        _fail(outcome, "the affected request did not get the right answer", context)


def assert_recovered(outcome: Outcome, context: str = "") -> None:
    if any(cls == "wedged" for cls in _classes(outcome)):
        _fail(outcome, "the server did not recover", context)


def assert_cache_reset(outcome: Outcome, context: str = "") -> None:
    if any(cls == "no_cache_reset" for cls in _classes(outcome)):
        _fail(outcome, "the prompt cache was not reset", context)


def assert_fired(outcome: Outcome, context: str = "") -> None:
    if not outcome.facts.fired:
        _fail(outcome, "the armed fault never fired", context)


def _classes(outcome: Outcome) -> list[str]:
    f = outcome.facts
    return [
        cls
        for cls, _ in (_process_class(f) + _request_class(f) + _health_class(f) + _cache_class(f))
    ]


def request_facts(observation: Any) -> dict[str, Any]:
    """The affected-request fields of :class:`Facts`, read off a workload Observation."""
    stream = bool(observation.stream)
    return {
        "stream": stream,
        "status": observation.status,
        "complete": bool(observation.complete),
        "got_bytes": bool(observation.got_bytes),
        "timed_out": bool(observation.timed_out),
        "structured_error": (not stream) and is_structured_error(observation.json),
        "stream_started": stream and observation.started_before_error,
        "sse_error_event": stream and observation.error_event is not None,
        "sse_done": stream and bool(observation.done),
        "ttfb": observation.ttfb,
    }
