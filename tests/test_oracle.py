"""The oracle, fed every kind of wrong server behaviour.

Part one feeds hand-made facts. Part two puts a misbehaving stand-in HTTP server (not
mlx_lm.server) behind the real workload client, so the facts come from real bytes.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from pytest_metaloom.judge import workload
from pytest_metaloom.judge.oracle import (
    Facts,
    NotGraceful,
    assert_cache_reset,
    assert_graceful,
    assert_recovered,
    classify,
    request_facts,
)

GOOD_ERROR = {"error": {"message": "out of memory", "type": "server_overloaded", "code": "x"}}


def graceful_facts(**changes) -> Facts:
    base = dict(
        fault="cmdbuf_oom",
        status=503,
        complete=True,
        got_bytes=True,
        structured_error=True,
        health_after_fault=200,
        health_after_recovery=200,
        recovery_statuses=[200],
        cache_sequences_after=0,
        cached_tokens_before=20,
        cached_tokens_after=0,
        pid_before=10,
        pid_after=10,
    )
    base.update(changes)
    return Facts(**base)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "graceful"),
        ({"alive": False, "returncode": -6, "signal": "SIGABRT"}, "aborted"),
        ({"pid_after": 11}, "aborted"),
        ({"status": None, "complete": False, "got_bytes": False, "timed_out": True}, "hang"),
        ({"status": None, "complete": False}, "request_lost"),
        ({"status": 500}, "wrong_status"),
        ({"status": 404, "recovery_ok": False, "recovery_statuses": [404]}, "wedged"),
        ({"status": 200, "complete": False}, "request_lost"),
        ({"structured_error": False}, "wrong_status"),
        ({"cached_tokens_after": 18}, "no_cache_reset"),
        ({"cache_sequences_after": 3}, "no_cache_reset"),
        ({"health_after_recovery": 503, "recovery_ok": False}, "wedged"),
        ({"health_after_recovery": 200, "recovery_ok": False}, "wedged"),
        ({"recovery_hung": True}, "wedged"),
        ({"fired": False}, "not_fired"),
        ({"fired": False, "alive": False, "returncode": -6}, "aborted"),
    ],
)
def test_classes_from_facts(changes, expected):
    outcome = classify(graceful_facts(**changes))
    assert outcome.outcome == expected, outcome.reasons


def test_runtime_error_needs_500_and_no_cache_reset():
    facts = graceful_facts(fault="runtime_error", expected_status=500, needs_cache_reset=False)
    assert classify(facts).outcome == "wrong_status"  # 503 is wrong for a non-OOM failure
    facts.status, facts.cached_tokens_after = 500, 30
    assert classify(facts).outcome == "graceful"


def test_stream_rules():
    started_ok = graceful_facts(
        stream=True, status=200, stream_started=True, sse_error_event=True, sse_done=True
    )
    assert classify(started_ok).outcome == "graceful"
    no_done = graceful_facts(stream=True, status=200, stream_started=True)
    assert classify(no_done).outcome == "request_lost"
    swallowed = graceful_facts(stream=True, status=200, stream_started=True, sse_done=True)
    assert classify(swallowed).outcome == "wrong_status"
    early = graceful_facts(stream=True, status=200, sse_error_event=True, sse_done=True)
    assert classify(early).outcome == "wrong_status"


def test_worst_class_wins_and_every_reason_is_kept():
    outcome = classify(graceful_facts(status=500, cached_tokens_after=9, recovery_ok=False))
    assert outcome.outcome == "wedged"
    assert len(outcome.reasons) == 4
    assert any("lying" in reason for reason in outcome.reasons)


def test_guard_restart_counts_as_survival_with_a_cold_cache():
    facts = graceful_facts(
        pid_after=11,
        behind_guard=True,
        worker_restarted=True,
        cached_tokens_after=None,
        cache_sequences_after=None,
    )
    assert classify(facts).outcome == "graceful"


def test_assertion_helpers_show_the_facts():
    outcome = classify(graceful_facts(cached_tokens_after=7))
    assert_recovered(outcome)
    with pytest.raises(NotGraceful, match="cached_tokens_after = 7"):
        assert_graceful(outcome, context="--- log tail ---\nboom")
    with pytest.raises(NotGraceful, match="prompt cache was not reset"):
        assert_cache_reset(outcome)


# -- real bytes from a misbehaving stand-in ------------------------------------------

BEHAVIOURS = {
    "graceful": b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s",
    "answers_500": b"HTTP/1.0 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s",
    "truncated_200": b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
    b'Content-Length: 999\r\n\r\n{"choices": [',
    "stream_without_done": b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
    "stream_error_done": b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    b'data: {"error": {"message": "oom", "type": "t"}}\n\ndata: [DONE]\n\n',
    "no_status_line": b"",
    "hang": None,
}


@pytest.fixture
def misbehaving_server():
    """A raw-socket stand-in that answers every request with one canned behaviour."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    state = {"behaviour": "graceful", "stop": False}
    held = []

    def serve():
        listener.settimeout(0.2)
        while not state["stop"]:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            canned = BEHAVIOURS[state["behaviour"]]
            if canned is None:
                held.append(conn)  # never answer
                continue
            if b"%d" in canned:
                body = json.dumps(GOOD_ERROR).encode()
                canned = canned % (len(body), body)
            conn.sendall(canned)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", state
    state["stop"] = True
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize(
    ("behaviour", "stream", "expected"),
    [
        ("graceful", False, "graceful"),
        ("answers_500", False, "wrong_status"),
        ("truncated_200", False, "request_lost"),
        ("stream_without_done", True, "request_lost"),
        ("stream_error_done", True, "graceful"),
        ("no_status_line", False, "request_lost"),
        ("hang", False, "hang"),
    ],
)
def test_classes_from_real_observations(misbehaving_server, behaviour, stream, expected):
    url, state = misbehaving_server
    state["behaviour"] = behaviour
    started = time.monotonic()
    obs = workload.chat(url, workload.single_turn(), stream=stream, deadline=1.5)
    assert time.monotonic() - started < 5
    facts = graceful_facts(**request_facts(obs))
    assert classify(facts).outcome == expected, (obs.summary(), classify(facts).reasons)


def test_memory_creep_over_cycles_is_not_a_reset():
    assert classify(graceful_facts(memory_creep_bytes=20_000)).outcome == "graceful"
    outcome = classify(graceful_facts(memory_creep_bytes=5 << 20))
    assert outcome.outcome == "no_cache_reset"
    assert any("crept" in reason for reason in outcome.reasons)
