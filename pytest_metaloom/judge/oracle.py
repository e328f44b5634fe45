"""Facts -> outcome class. Pure: no server, no HTTP, no pytest.

Every fact is tri-state: observed true, observed false, or unknown (``None``, the
default). A failure needs one observation that shows it; ``graceful`` needs a positive
observation for every element of the promise:

- the process survived (same pid, or a worker restart the guard reported);
- the affected request got the expected status and a structured error body (or, on a
  stream that had started, a structured error event followed by ``[DONE]``);
- every bystander got a complete answer or the same error (never a hang or a cut), and
  was shown in flight when the fault fired (the fault's event lists it among the requests
  the server was serving): a bystander that finished before the fault, or started after
  it, answered nothing about the blast radius;
- the recovery requests succeeded and ``/health`` answers 200;
- where the fault needs a cache reset, both witnesses: the server-side cache event shows
  the prompt cache emptied, and a probe prompt proven warm before the fault
  (``cached_tokens_before > 0``) answers cold after it;
- where the scenario repeats fault and recovery (``needs_memory_creep``), the active
  memory was measured after every cycle and did not creep.

Where no failure was observed but a witness is missing, the class is ``unproven`` and
the outcome names each missing witness. The worst class that applies wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

OUTCOMES = (
    "aborted",
    "hang",
    "wedged",
    "request_lost",
    "wrong_status",
    "no_cache_reset",
    "unproven",
    "graceful",
)
NOT_FIRED = "not_fired"
UNPROVEN = "unproven"
SEVERITY = {name: rank for rank, name in enumerate(OUTCOMES)}
MEMORY_CREEP_LIMIT = 1 << 20  # bytes over all cycles; the tiny model's KV is ~256 B/token

# What one bystander (a request in flight beside the affected one) got, in words.
BYSTANDER_ANSWERED = "answered"  # a complete, successful answer
BYSTANDER_SERVED = "served"  # a stream still being served after the fault (ended by us)
BYSTANDER_SAME_ERROR = "same_error"  # the same structured error as the affected request
BYSTANDER_HANG = "hang"  # no complete answer before its deadline
BYSTANDER_TRUNCATED = "truncated"  # a 200 cut before its end
BYSTANDER_LOST = "lost"  # no status line / not valid HTTP
BYSTANDER_OTHER_ERROR = "other_error"  # an error that is not the affected request's
BYSTANDER_UNKNOWN = "unknown"  # the client could not observe it


@dataclass
class Facts:
    """What was observed around one injected fault. ``None`` means "not observed"."""

    fault: str
    expected_status: int = 503
    needs_cache_reset: bool = True
    fired: bool | None = None
    # process
    alive: bool | None = None
    pid_before: int | None = None
    pid_after: int | None = None
    returncode: int | None = None
    signal: str | None = None
    behind_guard: bool = False
    worker_restarted: bool | None = None
    # the affected request
    stream: bool = False
    status: int | None = None
    complete: bool | None = None
    got_bytes: bool | None = None
    timed_out: bool | None = None
    client_error: str | None = None  # the client failed: nothing of this request was seen
    structured_error: bool | None = None
    stream_started: bool | None = None
    sse_error_event: bool | None = None
    sse_done: bool | None = None  # [DONE] ended the stream (after the error event, if any)
    protocol_error: str | None = None
    ttfb: float | None = None
    # after the fault
    health_after_fault: int | None = None
    health_after_recovery: int | None = None
    recovery_statuses: list[int | None] = field(default_factory=list)
    recovery_ok: bool | None = None
    recovery_hung: bool | None = None
    # cache reset
    cache_sequences_after: int | None = None
    cached_tokens_cold: int | None = None  # the probe's first (never seen) send
    cached_tokens_before: int | None = None
    cached_tokens_after: int | None = None
    # blast radius: one BYSTANDER_* word per request in flight beside the affected one
    bystanders: list[str] = field(default_factory=list)
    # per bystander: shown in flight when the fault fired (True), shown not (False: it
    # finished before or started after), or unknown (None; a missing entry is unknown)
    bystanders_in_flight: list[bool | None] = field(default_factory=list)
    # memory: active bytes at the first request after recovery, and the creep over
    # repeated fault/recover cycles (None when not measured)
    memory_after: int | None = None
    memory_creep_bytes: int | None = None
    needs_memory_creep: bool = False  # a cycles scenario: the creep is what it is for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    outcome: str
    reasons: list[str]
    facts: Facts
    missing: list[str] = field(default_factory=list)  # witnesses that were not observed

    @property
    def graceful(self) -> bool:
        return self.outcome == "graceful"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "reasons": self.reasons,
            "missing": self.missing,
            "facts": self.facts.to_dict(),
        }


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


# A finding is (class, text); class UNPROVEN marks a missing witness, named by the text.
Finding = tuple[str, str]


def _missing(witness: str) -> Finding:
    return (UNPROVEN, witness)


def fired_rule(f: Facts) -> list[Finding]:
    """The fault must be shown to have fired (event log or injector status)."""
    if f.fired is None:
        return [_missing("that the fault fired (no fired event and no injector status)")]
    if f.fired is False and f.alive is False:
        return [("aborted", "the process died although the armed fault never fired")]
    return []


def process_rule(f: Facts) -> list[Finding]:
    """Survival: alive, and the same pid (or a worker restart the guard reported)."""
    if f.alive is None:
        return [_missing("whether the server process is still alive")]
    if not f.alive:
        how = f.signal or (f"exit code {f.returncode}" if f.returncode is not None else "gone")
        return [("aborted", f"the server process died ({how})")]
    if f.pid_before is not None and f.pid_after is not None:
        if f.pid_before != f.pid_after and not f.behind_guard:
            return [("aborted", f"the server pid changed {f.pid_before} -> {f.pid_after}")]
        return []
    if f.behind_guard and f.worker_restarted:
        return []  # the guard reported the restart: survival through the supervisor
    return [_missing("the server pid before and after the fault (same process)")]


def request_rule(f: Facts) -> list[Finding]:
    """The affected request: the expected status and a structured error, to its end."""
    if f.status is None and f.timed_out is None and f.complete is None and f.got_bytes is None:
        failed = f" (the client failed: {f.client_error})" if f.client_error else ""
        return [_missing(f"the affected request's answer{failed}")]
    if f.timed_out and not f.complete:
        streamed = " (bytes had streamed, then stopped)" if f.got_bytes else ""
        return [("hang", f"the affected request got no complete answer in time{streamed}")]
    if f.protocol_error:
        bad = f"the affected request's answer is not valid HTTP ({f.protocol_error})"
        return [("request_lost", bad)]
    if f.status is None:
        return [("request_lost", "the affected request got no status line")]
    if f.stream and f.status == 200:
        return _stream_findings(f)
    if not f.complete:
        return [("request_lost", f"the {f.status} response was cut before its end")]
    if f.status != f.expected_status:
        wrong = f"answered {f.status}, expected {f.expected_status} for {f.fault}"
        return [("wrong_status", wrong)]
    if f.structured_error is None:
        return [_missing("the affected request's error body")]
    if not f.structured_error:
        return [("wrong_status", f"{f.status} without a structured JSON error body")]
    return []


def _stream_findings(f: Facts) -> list[Finding]:
    if f.sse_error_event and f.sse_done and not f.stream_started:
        return [("wrong_status", f"nothing was streamed yet, so it should be {f.expected_status}")]
    if f.sse_error_event and f.sse_done:
        if f.structured_error is None:
            return [_missing("the stream's error event body")]
        if not f.structured_error:
            return [("wrong_status", "the stream's error event is not a structured error")]
        return []  # a stream that had started ended properly: error event, then [DONE]
    if f.sse_error_event is None or f.sse_done is None:
        return [_missing("how the affected stream ended")]
    if f.sse_error_event:
        return [("request_lost", "the stream's error event was not followed by [DONE]")]
    if not f.sse_done:
        return [("request_lost", "the stream ended with neither an error event nor [DONE]")]
    return [("wrong_status", "the stream ended with [DONE] but no error event")]


def bystander_rule(f: Facts) -> list[Finding]:
    """Requests in flight beside the affected one: a complete answer or the same error.

    A failure counts wherever the bystander was; an answer counts as evidence only for a
    bystander shown in flight when the fault fired.
    """
    found: list[Finding] = []
    for index, got in enumerate(f.bystanders, 1):
        word, _, detail = got.partition(":")
        if word in (BYSTANDER_ANSWERED, BYSTANDER_SERVED, BYSTANDER_SAME_ERROR):
            found += _in_flight_findings(f, index)
        elif word == BYSTANDER_HANG:
            found.append(("hang", f"bystander {index} got no complete answer before its deadline"))
        elif word == BYSTANDER_TRUNCATED:
            found.append(("request_lost", f"bystander {index} got a 200 cut before its end"))
        elif word == BYSTANDER_LOST:
            found.append(("request_lost", f"bystander {index} got no valid HTTP answer"))
        elif word == BYSTANDER_OTHER_ERROR:
            found.append(
                (
                    "wrong_status",
                    f"bystander {index} got {detail or 'an error'}, "
                    "not a complete answer nor the affected request's error",
                )
            )
        else:
            found.append(_missing(f"bystander {index}'s answer"))
    return found


def _in_flight_findings(f: Facts, index: int) -> list[Finding]:
    shown = f.bystanders_in_flight[index - 1] if index <= len(f.bystanders_in_flight) else None
    if shown:
        return []
    if shown is None:
        why = "no fault event names it among the requests the server was serving"
    else:
        why = "it had finished before the fault fired, or started after it"
    return [_missing(f"bystander {index} in flight when the fault fired ({why})")]


def recovery_rule(f: Facts) -> list[Finding]:
    """After the fault: requests succeed and /health answers 200 (and does not lie)."""
    if f.alive is False:
        return []  # a dead process is judged by the process rule
    found: list[Finding] = []
    if f.recovery_hung:
        found.append(("wedged", "a request after the fault hung"))
    if f.recovery_ok is False:
        statuses = ", ".join(str(s) for s in f.recovery_statuses)
        found.append(("wedged", f"requests after the fault failed ({statuses})"))
        if 200 in (f.health_after_recovery, f.health_after_fault):
            found.append(("wedged", "/health says 200 while requests fail (a lying health check)"))
    elif f.recovery_ok is None or not f.recovery_statuses:
        found.append(_missing("recovery requests after the fault"))
    if f.health_after_recovery is None:
        found.append(_missing("/health after recovery"))
    elif f.health_after_recovery != 200:
        found.append(("wedged", f"/health answers {f.health_after_recovery} after recovery"))
    return found


def cache_rule(f: Facts) -> list[Finding]:
    """A fault that needs a reset: both witnesses show the prompt cache emptied."""
    if not f.needs_cache_reset or f.alive is False:
        return []
    if f.behind_guard and f.worker_restarted:
        return []  # the guard reported a fresh worker: its cache is empty by construction
    found: list[Finding] = []
    if f.memory_creep_bytes is not None and f.memory_creep_bytes > MEMORY_CREEP_LIMIT:
        found.append(
            (
                "no_cache_reset",
                f"active memory crept by {f.memory_creep_bytes} bytes over repeated "
                "fault/recover cycles: the reset does not release memory",
            )
        )
    if f.cache_sequences_after is None:
        found.append(_missing("the server-side prompt-cache event after the fault"))
    elif f.cache_sequences_after > 0:
        found.append(
            ("no_cache_reset", f"the prompt cache still holds {f.cache_sequences_after} sequences")
        )
    # "cold" = no more cache than the probe got on its first, never-seen send: a prompt
    # cached after the reset may share the chat template's first tokens with the probe
    cold = max(f.cached_tokens_cold or 0, 0)
    if f.cached_tokens_before is None:
        found.append(_missing("usage.cached_tokens of the probe prompt before the fault"))
    elif f.cached_tokens_before <= cold:
        found.append(
            _missing(
                f"a probe prompt proven warm before the fault (it reported "
                f"{f.cached_tokens_before} cached tokens, no more than a cold send, so a cold "
                "answer after the fault proves nothing)"
            )
        )
    if f.cached_tokens_after is None:
        found.append(_missing("usage.cached_tokens of the probe prompt after the fault"))
    elif f.cached_tokens_after > cold:
        found.append(
            (
                "no_cache_reset",
                f"a prompt warm before the fault still reports {f.cached_tokens_after} cached "
                f"tokens after it (a cold send got {cold})",
            )
        )
    return found


def memory_rule(f: Facts) -> list[Finding]:
    """A repeated fault/recover scenario needs its one witness: the memory creep."""
    if not f.needs_memory_creep or f.alive is False:
        return []
    if f.behind_guard and f.worker_restarted:
        return []  # every cycle got a fresh worker: nothing can creep across them
    if f.memory_creep_bytes is None:
        return [
            _missing(
                "the active-memory creep over the fault/recover cycles (a sample after every "
                "cycle's recovery)"
            )
        ]
    return []  # over the limit is judged by the cache rule (the reset did not release it)


RULES: tuple[Callable[[Facts], list[Finding]], ...] = (
    fired_rule,
    process_rule,
    request_rule,
    bystander_rule,
    recovery_rule,
    cache_rule,
    memory_rule,
)


def _decide(found: list[Finding], facts: Facts, ok_reason: str) -> Outcome:
    failures = [item for item in found if item[0] != UNPROVEN]
    missing = [text for cls, text in found if cls == UNPROVEN]
    if failures:
        worst = min(failures, key=lambda item: SEVERITY[item[0]])[0]
        reasons = [reason for _, reason in failures]
        reasons += [f"not observed: {text}" for text in missing]
        return Outcome(worst, reasons, facts, missing)
    if missing:
        return Outcome(UNPROVEN, [f"not observed: {text}" for text in missing], facts, missing)
    return Outcome("graceful", [ok_reason], facts)


def classify(facts: Facts) -> Outcome:
    """Assign the worst outcome class that the facts support (``unproven`` if no proof)."""
    if facts.fired is False and facts.alive is not False:
        return Outcome(NOT_FIRED, ["the armed fault never fired: the test proved nothing"], facts)
    found = [finding for rule in RULES for finding in rule(facts)]
    shown = f"survived, answered as expected, recovered, {_cache_words(facts)}"
    return _decide(found, facts, shown)


def _cache_words(facts: Facts) -> str:
    """What a graceful verdict says of the cache: only what was needed and shown."""
    if not facts.needs_cache_reset:
        return f"no cache reset needed for {facts.fault}"
    if facts.behind_guard and facts.worker_restarted:
        return "a fresh worker (the guard reported the restart)"
    return "cache reset shown"


# -- assertion helpers for downstream tests ------------------------------------------


class NotGraceful(AssertionError):
    pass


def _fail(
    outcome: Outcome, what: str, context: str = "", found: list[Finding] | None = None
) -> None:
    shown = _decide(found, outcome.facts, "") if found is not None else outcome
    lines = [f"{what}: outcome {shown.outcome}", *(f"  - {r}" for r in shown.reasons)]
    lines.append("facts:")
    lines += [f"  {k} = {v!r}" for k, v in outcome.facts.to_dict().items()]
    if context:
        lines += ["", context]
    raise NotGraceful("\n".join(lines))


def _check(
    outcome: Outcome,
    rules: tuple[Callable[[Facts], list[Finding]], ...],
    what: str,
    context: str,
    allow_unproven: bool,
) -> None:
    found = [finding for rule in rules for finding in rule(outcome.facts)]
    if allow_unproven:
        found = [item for item in found if item[0] != UNPROVEN]
    if found:
        _fail(outcome, what, context, found)


def assert_graceful(outcome: Outcome, context: str = "", *, allow_unproven: bool = False) -> None:
    """Fail with the facts (and any context: events, log tail) unless graceful.

    An ``unproven`` outcome fails too (its missing witnesses are listed) unless
    ``allow_unproven`` is given.
    """
    if outcome.graceful or (allow_unproven and outcome.outcome == UNPROVEN):
        return
    _fail(outcome, "the server did not handle the fault gracefully", context)


def assert_fired(outcome: Outcome, context: str = "", *, allow_unproven: bool = False) -> None:
    """The fault fired (a missing fired witness fails unless ``allow_unproven``)."""
    if outcome.facts.fired is False:
        _fail(outcome, "the armed fault never fired", context)
    _check(outcome, (fired_rule,), "no evidence that the fault fired", context, allow_unproven)


def assert_survived(outcome: Outcome, context: str = "", *, allow_unproven: bool = False) -> None:
    """Alive and the same process (or a guard-reported restart): shown, not assumed."""
    _check(outcome, (process_rule,), "the server's survival", context, allow_unproven)


def assert_status(outcome: Outcome, context: str = "", *, allow_unproven: bool = False) -> None:
    """The affected request and every bystander got the right answer."""
    _check(
        outcome,
        (request_rule, bystander_rule),
        "the affected request did not get the right answer",
        context,
        allow_unproven,
    )


def assert_recovered(outcome: Outcome, context: str = "", *, allow_unproven: bool = False) -> None:
    """Requests after the fault succeed and /health answers 200 (process alive first)."""
    rules = (process_rule, recovery_rule)
    _check(outcome, rules, "the server did not recover", context, allow_unproven)


def assert_cache_reset(
    outcome: Outcome, context: str = "", *, allow_unproven: bool = False
) -> None:
    """Both cache witnesses show the prompt cache emptied by the reset (and, for a
    repeated fault/recover scenario, that memory did not creep)."""
    _check(
        outcome,
        (cache_rule, memory_rule),
        "the prompt cache was not reset",
        context,
        allow_unproven,
    )


def request_facts(observation: Any) -> dict[str, Any]:
    """The affected-request fields of :class:`Facts`, read off a workload Observation.

    A client that failed (an exception) or never returned (``None``) observed nothing:
    every field stays unknown and ``client_error`` names why.
    """
    if not hasattr(observation, "status"):
        if observation is None:
            why = "the client thread did not return within its bound"
        else:
            why = f"{type(observation).__name__}: {observation}"
        return {"client_error": why}
    stream = bool(observation.stream)
    error_event = observation.error_event if stream else None
    if stream and error_event is not None:
        done = bool(observation.done_after_error)
    else:
        done = stream and bool(observation.done)
    return {
        "stream": stream,
        "status": observation.status,
        "complete": bool(observation.complete),
        "got_bytes": bool(observation.got_bytes),
        "timed_out": bool(observation.timed_out),
        "structured_error": is_structured_error(error_event if stream else observation.json),
        "stream_started": stream and observation.started_before_error,
        "sse_error_event": stream and error_event is not None,
        "sse_done": done,
        "protocol_error": observation.protocol_error,
        "ttfb": observation.ttfb,
    }


def error_of(observation: Any) -> dict | None:
    """The structured error an observation carries (body or stream event), if any."""
    payload = observation.error_event if observation.stream else observation.json
    return payload["error"] if is_structured_error(payload) else None


def bystander_fact(observation: Any, affected: Any, expected_status: int) -> str:
    """One bystander's observation in a word (see ``BYSTANDER_*``)."""
    if not hasattr(observation, "status"):
        return BYSTANDER_UNKNOWN  # the client thread failed or never returned
    if getattr(observation, "stopped", False) and not observation.timed_out:
        # the client ended a stream that went on after the fault: served, if clean so far
        clean = observation.status == 200 and observation.error_event is None
        if clean and not observation.protocol_error and observation.token_events:
            return BYSTANDER_SERVED
    if observation.ok:
        return BYSTANDER_ANSWERED
    if observation.timed_out and not observation.complete:
        return BYSTANDER_HANG
    if observation.protocol_error or observation.status is None:
        return BYSTANDER_LOST
    if not observation.complete or (observation.stream and not observation.done):
        return BYSTANDER_TRUNCATED if observation.status == 200 else BYSTANDER_LOST
    error = error_of(observation)
    theirs = error_of(affected) if hasattr(affected, "status") else None
    if error is not None:
        status_ok = observation.stream or observation.status == expected_status
        same_kind = theirs is None or error.get("type") == theirs.get("type")
        if status_ok and same_kind:
            return BYSTANDER_SAME_ERROR
    return f"{BYSTANDER_OTHER_ERROR}:{observation.status}"
