"""The oracle, fed every kind of wrong server behaviour and every missing witness.

Part one feeds hand-made facts: each rule has a case that flips the class if the rule
is removed, each witness a case where its absence makes the row ``unproven``, each
bystander outcome its own case. Part two puts adversarial stand-in HTTP servers (not
mlx_lm.server) behind the real workload client, so the facts come from real bytes.
"""

from __future__ import annotations

import json
import time

import pytest
from standins.adversarial_http import BEHAVIOURS, adversarial_server

from pytest_metaloom.judge import workload
from pytest_metaloom.judge.oracle import (
    BYSTANDER_ANSWERED,
    BYSTANDER_SAME_ERROR,
    BYSTANDER_SERVED,
    Facts,
    NotGraceful,
    assert_cache_reset,
    assert_fired,
    assert_graceful,
    assert_recovered,
    assert_status,
    assert_survived,
    bystander_fact,
    classify,
    request_facts,
)


def graceful_facts(**changes) -> Facts:
    """Facts with a positive observation for every element of the graceful promise."""
    base = dict(
        fault="cmdbuf_oom",
        fired=True,
        alive=True,
        status=503,
        complete=True,
        got_bytes=True,
        timed_out=False,
        structured_error=True,
        stream_started=False,
        sse_error_event=False,
        sse_done=False,
        health_after_fault=200,
        health_after_recovery=200,
        recovery_statuses=[200, 200],
        recovery_ok=True,
        recovery_hung=False,
        cache_sequences_after=0,
        cached_tokens_before=20,
        cached_tokens_after=0,
        pid_before=10,
        pid_after=10,
        bystanders=[BYSTANDER_ANSWERED],
        bystanders_in_flight=[True],
    )
    base.update(changes)
    return Facts(**base)


def test_full_evidence_is_graceful():
    outcome = classify(graceful_facts())
    assert outcome.outcome == "graceful", outcome.reasons
    assert outcome.missing == []


# Each row breaks one rule; removing that rule from the oracle turns the row graceful.
@pytest.mark.parametrize(
    ("changes", "expected", "says"),
    [
        ({"alive": False, "returncode": -6, "signal": "SIGABRT"}, "aborted", "SIGABRT"),
        ({"pid_after": 11}, "aborted", "pid changed"),
        ({"fired": False, "alive": False, "returncode": -6}, "aborted", "never fired"),
        ({"fired": False}, "not_fired", "never fired"),
        (
            {"status": None, "complete": False, "got_bytes": False, "timed_out": True},
            "hang",
            "no complete answer",
        ),
        (
            {
                "stream": True,
                "status": 200,
                "complete": False,
                "timed_out": True,
                "stream_started": True,
            },
            "hang",
            "bytes had streamed",
        ),
        ({"status": None, "complete": False}, "request_lost", "no status line"),
        ({"status": None, "protocol_error": "bad Content-Length"}, "request_lost", "not valid"),
        ({"status": 200, "complete": False}, "request_lost", "cut before its end"),
        ({"status": 500}, "wrong_status", "expected 503"),
        ({"structured_error": False}, "wrong_status", "structured"),
        ({"recovery_ok": False, "recovery_statuses": [404]}, "wedged", "failed (404)"),
        ({"health_after_recovery": 503}, "wedged", "/health answers 503"),
        (
            {"health_after_recovery": 503, "health_after_fault": 200, "recovery_ok": False},
            "wedged",
            "lying",
        ),
        ({"recovery_hung": True}, "wedged", "hung"),
        ({"cached_tokens_after": 18}, "no_cache_reset", "18 cached"),
        ({"cached_tokens_cold": 2, "cached_tokens_after": 3}, "no_cache_reset", "3 cached"),
        ({"cache_sequences_after": 3}, "no_cache_reset", "3 sequences"),
        ({"memory_creep_bytes": 5 << 20}, "no_cache_reset", "crept"),
    ],
)
def test_each_rule_decides_its_class(changes, expected, says):
    outcome = classify(graceful_facts(**changes))
    assert outcome.outcome == expected, outcome.reasons
    assert any(says in reason for reason in outcome.reasons), outcome.reasons


def test_the_lying_health_check_is_its_own_reason():
    outcome = classify(graceful_facts(recovery_ok=False, recovery_statuses=[503]))
    assert any("lying" in reason for reason in outcome.reasons)
    honest = classify(
        graceful_facts(
            recovery_ok=False,
            recovery_statuses=[503],
            health_after_recovery=503,
            health_after_fault=503,
        )
    )
    assert not any("lying" in reason for reason in honest.reasons)


STREAM = dict(stream=True, status=200, stream_started=True, sse_error_event=True, sse_done=True)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "graceful"),
        ({"sse_done": False}, "request_lost"),  # error event, no [DONE] after it
        ({"sse_error_event": False, "sse_done": False}, "request_lost"),
        ({"sse_error_event": False}, "wrong_status"),  # [DONE] swallowed the failure
        ({"stream_started": False}, "wrong_status"),  # nothing streamed: should be 503
        ({"structured_error": False}, "wrong_status"),  # the error event is not structured
    ],
)
def test_stream_rules(changes, expected):
    outcome = classify(graceful_facts(**{**STREAM, **changes}))
    assert outcome.outcome == expected, outcome.reasons


def test_a_shared_template_prefix_after_the_reset_is_still_cold():
    """A bystander cached after the reset shares the chat template's first tokens."""
    facts = graceful_facts(cached_tokens_cold=2, cached_tokens_after=2, cached_tokens_before=80)
    assert classify(facts).outcome == "graceful"


def test_runtime_error_needs_500_and_no_cache_reset():
    facts = graceful_facts(fault="runtime_error", expected_status=500, needs_cache_reset=False)
    assert classify(facts).outcome == "wrong_status"  # 503 is wrong for a non-OOM failure
    facts.status, facts.cached_tokens_after, facts.cache_sequences_after = 500, 30, 2
    assert classify(facts).outcome == "graceful"


def test_a_graceful_reason_claims_a_cache_reset_only_where_one_was_shown():
    assert classify(graceful_facts()).reasons[0].endswith("cache reset shown")
    # a server with no cache witness at all, for a fault that needs no reset (vllm-mlx)
    facts = graceful_facts(
        fault="gpu_timeout",
        needs_cache_reset=False,
        cache_sequences_after=None,
        cached_tokens_before=None,
        cached_tokens_after=None,
    )
    outcome = classify(facts)
    assert outcome.outcome == "graceful"
    assert "cache reset shown" not in outcome.reasons[0]
    assert "no cache reset needed for gpu_timeout" in outcome.reasons[0]
    restarted = graceful_facts(
        pid_after=None, behind_guard=True, worker_restarted=True, cache_sequences_after=None
    )
    assert "fresh worker" in classify(restarted).reasons[0]


def test_worst_class_wins_and_every_reason_is_kept():
    outcome = classify(graceful_facts(status=500, cached_tokens_after=9, recovery_ok=False))
    assert outcome.outcome == "wedged"
    assert len(outcome.reasons) == 4
    assert any("lying" in reason for reason in outcome.reasons)


def test_guard_restart_counts_as_survival_with_a_cold_cache():
    facts = graceful_facts(
        pid_after=None,
        behind_guard=True,
        worker_restarted=True,
        cached_tokens_after=None,
        cache_sequences_after=None,
    )
    assert classify(facts).outcome == "graceful"
    facts.worker_restarted = None  # without the guard's word, nothing shows a fresh cache
    outcome = classify(facts)
    assert outcome.outcome == "unproven"


# -- missing witnesses: each alone makes an otherwise perfect row unproven -----------------


@pytest.mark.parametrize(
    ("changes", "witness"),
    [
        ({"fired": None}, "fault fired"),
        ({"alive": None}, "still alive"),
        ({"pid_before": None}, "pid before and after"),
        ({"pid_after": None}, "pid before and after"),
        (
            {"status": None, "complete": None, "timed_out": None, "got_bytes": None},
            "affected request's answer",
        ),
        ({"structured_error": None}, "error body"),
        ({**STREAM, "structured_error": None}, "error event body"),
        ({**STREAM, "sse_error_event": None, "sse_done": None}, "how the affected stream"),
        ({"recovery_ok": None}, "recovery requests"),
        ({"recovery_statuses": []}, "recovery requests"),
        ({"health_after_recovery": None}, "/health after recovery"),
        ({"cache_sequences_after": None}, "server-side prompt-cache event"),
        ({"cached_tokens_before": None}, "cached_tokens of the probe prompt before"),
        ({"cached_tokens_before": 0}, "proven warm before the fault"),
        ({"cached_tokens_cold": 20, "cached_tokens_before": 20}, "proven warm before the fault"),
        ({"cached_tokens_after": None}, "cached_tokens of the probe prompt after"),
        ({"bystanders": ["unknown"]}, "bystander 1's answer"),
        # an answer from a bystander not shown in flight says nothing about the blast radius
        ({"bystanders_in_flight": [False]}, "bystander 1 in flight when the fault fired"),
        ({"bystanders_in_flight": [None]}, "no fault event names it among the requests"),
        ({"bystanders_in_flight": []}, "bystander 1 in flight"),  # a missing entry: unknown
        (
            {
                "bystanders": [BYSTANDER_SAME_ERROR, BYSTANDER_SERVED],
                "bystanders_in_flight": [True],
            },
            "bystander 2 in flight",
        ),
        # a cycles row is for its memory creep: unmeasured, it proves nothing
        ({"needs_memory_creep": True}, "active-memory creep"),
        # the client failed: the affected request is unknown, and the error is named
        (
            {
                "status": None,
                "complete": None,
                "timed_out": None,
                "got_bytes": None,
                "client_error": "RuntimeError: client thread died",
            },
            "the client failed: RuntimeError: client thread died",
        ),
    ],
)
def test_each_missing_witness_is_unproven_and_named(changes, witness):
    outcome = classify(graceful_facts(**changes))
    assert outcome.outcome == "unproven", outcome.reasons
    assert any(witness in text for text in outcome.missing), outcome.missing
    assert all(reason.startswith("not observed: ") for reason in outcome.reasons)


def test_facts_default_to_unknown_never_to_fine():
    """The issue's example: status, body and completeness alone prove nothing more."""
    facts = Facts(fault="cmdbuf_oom", status=503, complete=True, structured_error=True)
    outcome = classify(facts)
    assert outcome.outcome == "unproven"
    assert len(outcome.missing) >= 6  # fired, alive, pid, recovery, /health, both cache


def test_an_observed_failure_outranks_missing_witnesses():
    outcome = classify(graceful_facts(status=500, cached_tokens_before=None))
    assert outcome.outcome == "wrong_status"
    assert outcome.missing and any(r.startswith("not observed:") for r in outcome.reasons)


# -- bystanders: one case per outcome --------------------------------------------------------


@pytest.mark.parametrize(
    ("bystanders", "expected"),
    [
        ([BYSTANDER_ANSWERED], "graceful"),
        ([BYSTANDER_SAME_ERROR], "graceful"),
        ([], "graceful"),  # a scenario without bystanders
        (["hang"], "hang"),
        (["truncated"], "request_lost"),
        (["lost"], "request_lost"),
        (["other_error:500"], "wrong_status"),
        (["unknown"], "unproven"),
        ([BYSTANDER_SERVED], "graceful"),  # still being served after the fault
        ([BYSTANDER_ANSWERED, "hang"], "hang"),
    ],
)
def test_bystander_outcomes(bystanders, expected):
    shown = [True] * len(bystanders)
    outcome = classify(graceful_facts(bystanders=bystanders, bystanders_in_flight=shown))
    assert outcome.outcome == expected, outcome.reasons


@pytest.mark.parametrize(
    ("bystanders", "in_flight", "expected"),
    [
        ([BYSTANDER_ANSWERED], [False], "unproven"),  # finished before the fault
        ([BYSTANDER_SAME_ERROR], [None], "unproven"),
        (["hang"], [False], "hang"),  # a failure counts wherever the bystander was
        (["other_error:500"], [None], "wrong_status"),
        ([BYSTANDER_ANSWERED, BYSTANDER_ANSWERED], [True, False], "unproven"),
    ],
)
def test_a_bystander_answer_counts_only_when_shown_in_flight(bystanders, in_flight, expected):
    outcome = classify(graceful_facts(bystanders=bystanders, bystanders_in_flight=in_flight))
    assert outcome.outcome == expected, outcome.reasons


def test_memory_creep_is_the_witness_of_a_cycles_row():
    assert classify(graceful_facts(needs_memory_creep=True, memory_creep_bytes=0)).graceful
    unmeasured = classify(graceful_facts(needs_memory_creep=True))
    assert unmeasured.outcome == "unproven" and "creep" in unmeasured.missing[0]
    with pytest.raises(NotGraceful, match="creep"):
        assert_cache_reset(unmeasured)
    # behind the guard, a restarted worker is a fresh process: nothing to creep across
    restarted = graceful_facts(
        needs_memory_creep=True, behind_guard=True, worker_restarted=True, pid_after=11
    )
    assert classify(restarted).graceful
    # a dead process is judged by the process rule, not by a missing memory sample
    dead = classify(graceful_facts(needs_memory_creep=True, alive=False, returncode=-6))
    assert dead.outcome == "aborted" and not any("creep" in m for m in dead.missing)


@pytest.mark.parametrize(
    ("failed", "says"),
    [
        (RuntimeError("client thread died"), "RuntimeError: client thread died"),
        (None, "did not return within its bound"),
    ],
)
def test_a_failed_client_leaves_the_affected_request_unknown_and_named(failed, says):
    fields = request_facts(failed)
    assert says in fields["client_error"]
    facts = graceful_facts(
        status=None, complete=None, timed_out=None, got_bytes=None, structured_error=None
    )
    facts.sse_error_event = facts.sse_done = facts.stream_started = None
    for key, value in fields.items():
        setattr(facts, key, value)
    outcome = classify(facts)
    assert outcome.outcome == "unproven"
    assert any(says in text for text in outcome.missing), outcome.missing


# -- assertion helpers follow the same rule -----------------------------------------------


def test_assertion_helpers_show_the_facts():
    outcome = classify(graceful_facts(cached_tokens_after=7))
    assert_recovered(outcome)
    assert_survived(outcome)
    with pytest.raises(NotGraceful, match="cached_tokens_after = 7"):
        assert_graceful(outcome, context="--- log tail ---\nboom")
    with pytest.raises(NotGraceful, match="prompt cache was not reset"):
        assert_cache_reset(outcome)


@pytest.mark.parametrize(
    ("helper", "changes"),
    [
        (assert_graceful, {"cached_tokens_before": None}),
        (assert_fired, {"fired": None}),
        (assert_survived, {"pid_after": None}),
        (assert_status, {"structured_error": None}),
        (assert_status, {"bystanders": ["unknown"]}),
        (assert_recovered, {"health_after_recovery": None}),
        (assert_cache_reset, {"cache_sequences_after": None}),
    ],
)
def test_helpers_fail_on_a_missing_witness_unless_allowed(helper, changes):
    outcome = classify(graceful_facts(**changes))
    helper(classify(graceful_facts()))  # full evidence passes
    with pytest.raises(NotGraceful, match="not observed"):
        helper(outcome)
    helper(outcome, allow_unproven=True)


def test_helpers_still_fail_on_an_observed_failure_when_unproven_is_allowed():
    with pytest.raises(NotGraceful, match="died"):
        assert_survived(classify(graceful_facts(alive=False)), allow_unproven=True)
    with pytest.raises(NotGraceful):
        assert_graceful(classify(graceful_facts(status=500)), allow_unproven=True)


# -- the SSE parser, per the specification --------------------------------------------------


def _parse(text: str, *, pieces: int = 1) -> list[dict]:
    parser = workload.SseParser()
    raw = text.encode()
    step = max(1, len(raw) // pieces)
    for start in range(0, len(raw), step):
        parser.feed(raw[start : start + step])
    return [{"event": e.event, "data": e.data} for e in parser.events]


@pytest.mark.parametrize("pieces", [1, 3, 97])
def test_sse_parser_follows_the_spec(pieces):
    text = (
        ": comment\n\n"
        "data:no space\n\n"
        "data:  two spaces\n\n"
        "data: line one\ndata: line two\n\n"
        "event: error\r\nid: 3\r\ndata: {}\r\n\r\n"
        "data\n\n"  # a field name alone: empty data, still an event
        "retry: 10\n\n"  # no data: nothing dispatched
        "data: cut without its blank line"
    )
    assert _parse(text, pieces=pieces) == [
        {"event": "message", "data": "no space"},
        {"event": "message", "data": " two spaces"},
        {"event": "message", "data": "line one\nline two"},
        {"event": "error", "data": "{}"},
        {"event": "message", "data": ""},
    ]


# -- real bytes from adversarial stand-ins -------------------------------------------------

# behaviour -> (stream request?, expected class)
JUDGED = {
    "graceful_503": (False, "graceful"),
    "chunked_503": (False, "graceful"),
    "no_length_503": (False, "graceful"),
    "split_headers_503": (False, "graceful"),
    "sse_nospace_error": (True, "graceful"),
    "sse_multiline_error": (True, "graceful"),
    "sse_comments_crlf_event_error": (True, "graceful"),
    "sse_chunked_error": (True, "graceful"),
    "answers_500": (False, "wrong_status"),
    "ok_with_error_body": (False, "wrong_status"),
    "plain_text_503": (False, "wrong_status"),
    "bad_content_length": (False, "request_lost"),
    "short_content_length": (False, "request_lost"),
    "no_status_line": (False, "request_lost"),
    "garbage_status_line": (False, "request_lost"),
    "sse_error_before_any_token": (True, "wrong_status"),
    "sse_without_done": (True, "request_lost"),
    "sse_done_without_error": (True, "wrong_status"),
    "sse_error_cut_mid_event": (True, "request_lost"),
    "sse_stalls_after_tokens": (True, "hang"),
    "silent": (False, "hang"),
    "slow_503": (False, "hang"),  # silent past the stall bound, and no progress signal
}


def test_every_stand_in_behaviour_is_judged():
    assert set(JUDGED) == set(BEHAVIOURS)


@pytest.mark.parametrize("behaviour", sorted(JUDGED))
def test_adversarial_stand_ins_are_judged_right(behaviour):
    stream, expected = JUDGED[behaviour]
    with adversarial_server(behaviour) as server:
        obs = workload.chat(
            server.url, workload.single_turn(), stream=stream, deadline=30, stall=0.5
        )
    facts = graceful_facts(**request_facts(obs))
    outcome = classify(facts)
    assert outcome.outcome == expected, (obs.summary(), outcome.reasons)


def test_a_stall_is_a_hang_long_before_the_deadline():
    with adversarial_server("sse_stalls_after_tokens") as server:
        obs = workload.chat(
            server.url, workload.single_turn(), stream=True, deadline=3600, stall=0.3
        )
    # ``stalled`` is set only when the stall bound, not the hour-long deadline, ended it
    assert obs.stalled and obs.timed_out and obs.got_bytes and not obs.complete


def test_progress_keeps_a_silent_but_working_server_from_being_hung():
    """A long prefill sends nothing for seconds; the server's CPU counter says it works."""
    with adversarial_server("slow_503") as server:
        working = workload.chat(
            server.url, workload.single_turn(), deadline=30, stall=0.5, progress=time.monotonic
        )
        idle = workload.chat(
            server.url, workload.single_turn(), deadline=30, stall=0.5, progress=lambda: 1.0
        )
    assert working.status == 503 and working.complete and not working.timed_out
    assert classify(graceful_facts(**request_facts(working))).outcome == "graceful"
    assert idle.stalled and classify(graceful_facts(**request_facts(idle))).outcome == "hang"


@pytest.mark.parametrize(
    ("behaviour", "stream", "word"),
    [
        ("graceful_503", False, "same_error"),
        ("sse_nospace_error", True, "same_error"),
        ("answers_500", False, "other_error:500"),
        ("ok_with_error_body", False, "other_error:200"),
        ("short_content_length", False, "lost"),
        ("sse_without_done", True, "truncated"),
        ("silent", False, "hang"),
    ],
)
def test_bystander_words_from_real_bytes(behaviour, stream, word):
    with adversarial_server("graceful_503") as server:
        affected = workload.chat(server.url, workload.single_turn(), deadline=10)
    with adversarial_server(behaviour) as server:
        obs = workload.chat(
            server.url, workload.single_turn(), stream=stream, deadline=30, stall=0.5
        )
    assert bystander_fact(obs, affected, 503) == word
    assert bystander_fact(RuntimeError("client thread died"), affected, 503) == "unknown"


def test_a_tap_sees_the_stream_and_ends_it_as_served_or_hung():
    """The runner's bystander: it streamed, went on, and the client ended it (``served``);
    or it made no progress and the client gave up (``hang``)."""
    with adversarial_server("graceful_503") as server:
        affected = workload.chat(server.url, workload.single_turn(), deadline=10)
    for stalled, word in ((False, BYSTANDER_SERVED), (True, "hang")):
        tap = workload.Tap()
        with adversarial_server("sse_stalls_after_tokens") as server:
            done = workload.concurrently(
                [
                    lambda tap=tap: workload.chat(
                        server.url, workload.single_turn(), stream=True, deadline=30, tap=tap
                    ),
                    lambda tap=tap, stalled=stalled: (
                        tap.wait(lambda events: any(map(workload.token_event, events)), 10),
                        tap.end(stalled=stalled),
                    ),
                ],
                timeout=40,
            )
        obs, (streamed, _) = done
        assert streamed and tap.closed and not obs.complete
        assert obs.stopped is not stalled and obs.timed_out is stalled
        assert bystander_fact(obs, affected, 503) == word
    # a stream that ends by itself closes the tap; ending it then changes nothing
    tap = workload.Tap()
    with adversarial_server("sse_without_done") as server:
        obs = workload.chat(server.url, workload.single_turn(), stream=True, deadline=30, tap=tap)
    tap.end()
    assert tap.closed and not obs.stopped and any(map(workload.error_sse, tap.events))
    assert bystander_fact(obs, affected, 503) == "truncated"


def test_a_complete_answer_is_an_answered_bystander():
    body = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()
    obs = workload.Observation(
        request_id="b", stream=False, status=200, complete=True, body=body, ttfb=0.1
    )
    assert bystander_fact(obs, obs, 503) == BYSTANDER_ANSWERED


# -- request fields travel with the server object, not with a global -----------------------


class _EchoServer:
    """A stand-in HTTP server that answers each POST with the JSON body it received."""

    def __init__(self, request_fields: dict | None = None) -> None:
        import http.server
        import threading

        class Echo(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                received = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(received)))
                self.end_headers()
                self.wfile.write(received)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.request_fields = dict(request_fields or {})
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> _EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def test_a_server_object_sends_its_own_request_fields_and_a_url_sends_none():
    with _EchoServer({"model": "org/vllm-model"}) as named, _EchoServer() as plain:
        from_named = workload.chat(named, workload.single_turn("a"), deadline=10).json
        by_url = workload.chat(named.url, workload.single_turn("b"), deadline=10).json
        from_plain = workload.chat(plain, workload.single_turn("c"), deadline=10).json
        explicit = workload.post(named, {"model": "mine", "max_tokens": 1}, deadline=10).json
    assert from_named["model"] == "org/vllm-model"
    assert "model" not in by_url and "model" not in from_plain  # nothing leaks between servers
    assert explicit["model"] == "mine"  # the caller's own field wins
