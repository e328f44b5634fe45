"""metaloom-guard against real processes: stand-in workers first, then the real mlx_lm.server.

The stand-in worker is a small HTTP server script (named STAND-IN everywhere) because it can do on
demand what the real server only does under Metal pressure: abort with the Metal OOM text before
answering or mid-stream, segfault, hang, or fail at start-up. The guard sees a real child process,
real sockets and real signals either way.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pytest_metaloom.guard import Guard, GuardConfigError, guard_command
from pytest_metaloom.guard.causes import classify_exit
from pytest_metaloom.guard.cli import main as guard_main
from pytest_metaloom.guard.evidence import read_failure
from pytest_metaloom.guard.failures import decide
from pytest_metaloom.guard.watchdog import SEND, Watch, Watchdog
from pytest_metaloom.guard.worker import worker_argv

pytestmark = pytest.mark.timeout(120)

CMDBUF_ABORT = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
)

# STAND-IN worker: behaviour per request from the JSON field "behave", at start-up from env vars.
STANDIN_SRC = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    ABORT_TEXT = @ABORT_TEXT@

    def die_abort():
        sys.stderr.write(ABORT_TEXT + "\\n")
        sys.stderr.flush()
        os.abort()

    start = os.environ.get("STANDIN_START", "")
    once = os.environ.get("STANDIN_ABORT_ONCE_FILE")
    if start == "abort" or (once and not os.path.exists(once)):
        if once:
            open(once, "w").close()
        die_abort()
    if start == "exit":
        sys.stderr.write("stand-in: cannot load model\\n")
        sys.exit(3)
    held = os.environ.get("STANDIN_HOLD")  # a folder: every start after the first waits for
    if held:                                # held/open (bounded), so a test can watch a restart
        os.makedirs(held, exist_ok=True)
        earlier = [n for n in os.listdir(held) if n.startswith("started-")]
        open(os.path.join(held, "started-%d" % os.getpid()), "w").close()
        deadline = time.monotonic() + 120
        while earlier and not os.path.exists(os.path.join(held, "open")):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    if os.environ.get("STANDIN_CHILD"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        with open(os.environ["STANDIN_CHILD"], "w") as f:
            f.write(str(child.pid))

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def _json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._json(200, {"path": self.path, "pid": os.getpid()})

        def do_OPTIONS(self):
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n) or b"{}")
            behave = req.get("behave", "")
            if behave == "abort_before":
                die_abort()
            if behave == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            if behave == "hang":
                time.sleep(300)
            if behave == "busy":  # single-threaded: new connections pile up in the backlog
                time.sleep(float(req.get("secs", 1.0)))
            if not req.get("stream"):
                self._json(200, {"pid": os.getpid(), "echo": req.get("prompt")})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            gate_seen = None
            for i in range(int(req.get("events", 3))):
                if behave == "abort_mid" and i == int(req.get("die_at", 2)):
                    die_abort()
                if behave == "gated" and i == 1:  # wait (bounded) until the client read event 0
                    deadline = time.monotonic() + 60
                    while not os.path.exists(req["gate"]) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    gate_seen = os.path.exists(req["gate"])
                event = {"i": i, "gate_seen": gate_seen}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\\n\\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\\n\\n")

    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
).replace("@ABORT_TEXT@", repr(CMDBUF_ABORT))


@pytest.fixture
def standin(tmp_path: Path) -> list[str]:
    """argv of the STAND-IN worker (``{port}`` is filled by the guard)."""
    script = tmp_path / "standin_worker.py"
    script.write_text(STANDIN_SRC)
    return [sys.executable, str(script), "{port}"]


class Lines(list):
    """Collects guard log lines (thread-safe append) for assertions."""

    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def guards(tmp_path: Path) -> Iterator[Any]:
    """Factory for in-process guards that are always stopped, also when a test fails."""
    started: list[Guard] = []

    def make(cmd: list[str], env: dict[str, str] | None = None, **opts: Any) -> Guard:
        log = Lines()
        opts.setdefault("log_dir", tmp_path / f"g{len(started)}")
        g = Guard(cmd, port=0, env=env, log=log.append, **opts)
        g.log_lines = log  # type: ignore[attr-defined]
        started.append(g)
        g.start()
        return g

    yield make
    for g in started:
        pid = g.supervisor.status()["worker_pid"]
        g.stop()
        if pid:
            assert not _alive(pid), f"worker {pid} survived guard.stop()"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def call(
    base: str, path: str, body: dict[str, Any] | None = None, method: str | None = None, t=30.0
) -> tuple[int, dict[str, str], bytes]:
    """One request; returns status, headers, full body (raises if the connection is cut)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=t)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method or ("POST" if data else "GET"), path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def stream_events(base: str, body: dict[str, Any], t: float = 30.0) -> tuple[int, list[tuple]]:
    """POST a streaming request; returns the status and (arrival time, event text) per SSE event."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=t)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
        resp = conn.getresponse()
        events = []
        while True:
            line = resp.fp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append((time.monotonic(), line[6:].strip().decode()))
        return resp.status, events
    finally:
        conn.close()


# ---- pure pieces --------------------------------------------------------------------------


def test_worker_argv_substitutes_or_replaces_the_port() -> None:
    assert worker_argv(["w", "--port={port}"], 4321) == ["w", "--port=4321"]
    out = worker_argv(["mlx_lm.server", "--model", "m", "--port", "8080", "--host=0.0.0.0"], 9)
    assert out == ["mlx_lm.server", "--model", "m", "--host", "127.0.0.1", "--port", "9"]


def test_classify_exit_names_cmdbuf_oom_and_signals() -> None:
    cause = classify_exit(-6, "INFO loading\n" + CMDBUF_ABORT + "\n")
    assert (cause.kind, cause.signal, cause.exit_code) == ("cmdbuf_oom", "SIGABRT", -6)
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in cause.line
    assert cause.describe() == "worker aborted (SIGABRT, rc -6): cmdbuf_oom"
    assert classify_exit(-11, "").kind == "segfault"
    assert classify_exit(-9, "").kind == "killed"


def test_bad_input_names_cause_and_fix() -> None:
    with pytest.raises(GuardConfigError, match="unknown guard option"):
        guard_command(["w"], 1, max_restart=3)
    with pytest.raises(GuardConfigError, match="after '--'"):
        Guard([], port=0)
    with pytest.raises(GuardConfigError, match="--queue-timeout must be >= 0"):
        Guard(["w"], port=0, queue_timeout=-1)
    with pytest.raises(GuardConfigError, match="--proof-window must be >= 0"):
        Guard(["w"], port=0, proof_window=-1)
    with pytest.raises(SystemExit):
        guard_main(["--port", "0"])  # no worker command


def test_guard_command_builds_argv() -> None:
    argv = guard_command(["mlx_lm.server", "--model", "m"], 8080, max_restarts=2, warmup=False)
    assert argv[:3] == [sys.executable, "-m", "pytest_metaloom.guard"]
    assert argv[argv.index("--max-restarts") + 1] == "2"
    assert "--no-warmup" in argv
    assert argv[argv.index("--") + 1 :] == ["mlx_lm.server", "--model", "m"]


LOOP_DEATH_LOG = """\
2026-12-02 00:32:58,461 - ERROR - mlx_lm.server generation thread died: [metal::malloc] \
Resource limit (499000) exceeded.
Traceback (most recent call last):
  File "mlx_lm/server.py", line 544, in _run_generate
RuntimeError: [metal::malloc] Resource limit (499000) exceeded.
"""


def _traceback(last: str) -> str:
    return f'Traceback (most recent call last):\n  File "x.py", line 1, in f\n{last}\n'


def test_read_failure_tells_the_loops_death_from_a_request_error() -> None:
    died = read_failure(LOOP_DEATH_LOG)
    assert died is not None and died.loop_died and died.is_oom
    assert died.kind == "resource_limit" and died.device_failure
    cuda_text = "RuntimeError: cudaMallocAsync(&data, size, stream) failed: out of memory"
    cuda = read_failure(_traceback(cuda_text))
    assert cuda is not None and not cuda.loop_died and cuda.is_oom
    assert cuda.kind == "unable_to_allocate"
    bug = read_failure(_traceback("ValueError: bad template"))
    assert bug is not None and bug.kind == "runtime_error" and not bug.device_failure
    # a handler that only noticed an earlier death, or a client that left: not this request's
    assert read_failure(_traceback("RuntimeError: generation thread died")) is None
    assert read_failure(_traceback("BrokenPipeError: [Errno 32] Broken pipe")) is None
    assert read_failure("INFO - Prompt processing progress: 10/11\n") is None


def test_decide_answers_by_what_was_proven() -> None:
    from pytest_metaloom.guard.diagnose import SERVING, UNKNOWN, WEDGED, Health

    wedged, serving = Health(WEDGED, "its /health answered 503"), Health(SERVING, "ok")
    oom = read_failure(LOOP_DEATH_LOG)
    bug = read_failure(_traceback("ValueError: bad template"))
    timeout_text = (
        "RuntimeError: [METAL] Command buffer execution failed: Caused GPU Timeout Error "
        "(00000002:kIOGPUCommandBufferCallbackErrorTimeout)."
    )
    gpu = read_failure(_traceback(timeout_text))
    r = decide(wedged, oom, said_wedged=False)
    assert (r.status, r.retry, r.cause.kind) == (503, False, "wedged") and r.retry_after
    assert json.loads(r.body)["error"]["error_kind"] == "resource_limit"
    r = decide(wedged, bug, said_wedged=False)
    assert (r.status, r.cause.kind) == (500, "wedged")
    r = decide(Health(UNKNOWN, "timed out"), None, said_wedged=True)
    assert (r.status, r.retry, r.cause.kind) == (503, True, "wedged")
    r = decide(serving, oom, said_wedged=False)
    assert (r.status, r.cause.kind) == (503, "resource_limit")  # recycled: memory is suspect
    r = decide(serving, gpu, said_wedged=False)
    assert (r.status, r.cause) == (503, None)
    r = decide(serving, bug, said_wedged=False)
    assert (r.status, r.cause, r.retry_after) == (500, None, False)
    r = decide(serving, None, said_wedged=False)
    assert (r.status, json.loads(r.body)["error"]["code"]) == (502, "empty_response")
    r = decide(Health(UNKNOWN, "timed out"), None, said_wedged=False)
    assert (r.status, r.cause) == (503, None) and r.retry_after


# ---- the watchdog on real sockets ---------------------------------------------------------


def test_watchdog_cuts_a_silent_worker_only_when_the_check_says_so() -> None:
    """A blocked recv wakes as soon as the hang check gives a reason; 'None' buys a new period."""
    calls: list[float] = []
    verdicts = iter([None, "hang"])

    def on_hang(w: Watch) -> str | None:
        calls.append(time.monotonic())
        return next(verdicts)

    dog = Watchdog(hang_timeout=0.3, client_timeout=60.0, on_hang=on_hang)
    ours, peer = socket.socketpair()
    try:
        w = dog.watch(ours, peer, context=None)
        t0 = time.monotonic()
        assert ours.recv(10) == b""  # blocks (no timeout) until the watchdog shuts it down
        took = time.monotonic() - t0
        assert w.fired == "hang"
        assert len(calls) == 2  # healthy once, then cut after a second full silent period
        # lower bounds only: the checks cannot come early, however loaded the machine is
        assert calls[0] - t0 >= 0.3 and calls[1] - calls[0] >= 0.3, (t0, calls)
        assert took >= 0.6, took
        dog.unwatch(w)
    finally:
        dog.stop()
        ours.close()
        peer.close()
    assert not dog._thread.is_alive()


def test_watchdog_cuts_a_client_that_stops_reading() -> None:
    """A blocking sendall to a client that never reads is bounded by client_timeout."""
    dog = Watchdog(hang_timeout=0, client_timeout=0.3, on_hang=lambda w: "never called")
    worker, client = socket.socketpair()  # nobody ever reads from ``worker``
    try:
        w = dog.watch(worker, client, context=None)
        w.since = time.monotonic()
        w.phase = SEND
        t0 = time.monotonic()
        with pytest.raises(OSError):
            client.sendall(b"x" * (64 * 1024 * 1024))  # far more than the socket buffers hold
        assert w.client_cut and w.fired is None
        assert time.monotonic() - t0 >= 0.3
        dog.unwatch(w)
    finally:
        dog.stop()
        worker.close()
        client.close()


def test_watchdog_sleeps_while_nothing_is_relayed() -> None:
    """No watches, no wake-ups: the thread waits on its condition until a relay registers."""
    dog = Watchdog(hang_timeout=0.05, client_timeout=60.0, on_hang=lambda w: None)
    try:
        time.sleep(0.2)
        frame = sys._current_frames()[dog._thread.ident]
        assert frame.f_code.co_name == "wait" and frame.f_back.f_code.co_name == "_loop"
        assert frame.f_locals["timeout"] is None  # Condition.wait() without a timeout
    finally:
        dog.stop()
    assert not dog._thread.is_alive()


# ---- stand-in worker ----------------------------------------------------------------------


def test_proxies_methods_and_reports_health(guards, standin) -> None:
    g = guards(standin)
    assert g.wait_serving()
    code, _, body = call(g.url, "/v1/completions", {"prompt": "hi"})
    assert code == 200
    assert json.loads(body)["echo"] == "hi"
    worker = json.loads(body)["pid"]
    code, _, body = call(g.url, "/v1/models?x=1")
    assert code == 200 and json.loads(body)["path"] == "/v1/models?x=1"
    code, headers, _ = call(g.url, "/v1/chat/completions", method="OPTIONS")
    assert code == 204 and headers.get("Access-Control-Allow-Origin") == "*"
    code, _, body = call(g.url, "/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    status = json.loads(call(g.url, "/metaloom/status")[2])
    assert status["state"] == "serving" and status["worker_pid"] == worker
    assert status["restarts"] == 0 and status["last_cause"] is None


def test_stream_reaches_client_incrementally(guards, standin, tmp_path) -> None:
    """The worker sends event 1 only after the client has read event 0 through the guard (a
    file gate, no clock): a guard that buffered would make the worker give up waiting."""
    g = guards(standin)
    assert g.wait_serving()
    gate = tmp_path / "client-read-event-0"
    body = {"stream": True, "events": 4, "behave": "gated", "gate": str(gate)}
    host, port = g.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=90)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.fp.readline()
        assert json.loads(first[6:])["i"] == 0
        gate.touch()
        rest = [ln[6:].strip() for ln in resp.fp.read().split(b"\n") if ln.startswith(b"data: ")]
    finally:
        conn.close()
    assert rest[-1] == b"[DONE]"
    assert [json.loads(e)["gate_seen"] for e in rest[:-1]] == [True, True, True]


def test_abort_in_flight_gets_503_with_cause_then_restart(guards, standin) -> None:
    g = guards(standin, backoff=0.05)
    assert g.wait_serving()
    first_pid = g.status()["worker_pid"]
    code, headers, body = call(g.url, "/v1/chat/completions", {"behave": "abort_before"})
    assert code == 503
    err = json.loads(body)["error"]
    assert err["type"] == "worker_died" and err["code"] == "cmdbuf_oom"
    assert err["exit_code"] == -6 and err["signal"] == "SIGABRT"
    assert "worker aborted (SIGABRT, rc -6): cmdbuf_oom" in err["message"]
    assert headers.get("Retry-After")
    assert g.wait_serving()
    code, _, body = call(g.url, "/v1/completions", {"prompt": "again"})
    assert code == 200 and json.loads(body)["pid"] != first_pid
    status = g.status()
    assert status["restarts"] == 1
    assert status["last_cause"]["kind"] == "cmdbuf_oom"
    assert status["last_cause"]["exit_code"] == -6
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in status["last_cause"]["line"]
    assert "exited rc=-6 cause=cmdbuf_oom" in g.log_lines.text()
    assert "restarting in 0.00s (1/5 in 60s)" in g.log_lines.text()


def test_abort_mid_stream_ends_with_error_event_and_done(guards, standin) -> None:
    g = guards(standin, backoff=0.05)
    assert g.wait_serving()
    body = {"stream": True, "events": 5, "behave": "abort_mid", "die_at": 2, "gap": 0.05}
    code, events = stream_events(g.url, body)
    assert code == 200
    texts = [e for _, e in events]
    assert [json.loads(t)["i"] for t in texts[:2]] == [0, 1]
    err = json.loads(texts[2])["error"]
    assert err["code"] == "cmdbuf_oom" and err["exit_code"] == -6
    assert texts[3:] == ["[DONE]"]


def test_segfault_is_named(guards, standin) -> None:
    g = guards(standin, backoff=0.05)
    assert g.wait_serving()
    code, _, body = call(g.url, "/v1/completions", {"behave": "segv"})
    assert code == 503
    err = json.loads(body)["error"]
    assert (err["code"], err["signal"], err["exit_code"]) == ("segfault", "SIGSEGV", -11)


def test_dies_at_start_guard_stays_up_and_says_why(guards, standin) -> None:
    g = guards(standin, env={"STANDIN_START": "abort"}, max_restarts=2, backoff=0.05)
    deadline = time.monotonic() + 20
    while g.status()["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = g.status()
    assert status["state"] == "failed"
    assert status["restarts"] == 2
    assert status["last_cause"]["kind"] == "cmdbuf_oom"
    assert "restart cap reached" in status["failed_reason"]
    code, _, body = call(g.url, "/health")
    assert code == 503 and "restart cap reached" in json.loads(body)["reason"]
    code, _, body = call(g.url, "/v1/completions", {"prompt": "x"})
    assert code == 503
    err = json.loads(body)["error"]
    assert err["type"] == "worker_unavailable" and err["code"] == "cmdbuf_oom"


def test_restart_cap_holds_under_repeated_deaths(guards, standin) -> None:
    g = guards(standin, max_restarts=2, restart_window=60, backoff=0.05)
    codes = []
    for _ in range(4):
        g.wait_serving()
        codes.append(call(g.url, "/v1/completions", {"behave": "abort_before"})[0])
    assert codes == [503, 503, 503, 503]
    status = g.status()
    assert status["state"] == "failed" and status["restarts"] == 2
    assert status["worker_pid"] is None
    assert "restart cap reached: 2 restarts in 60s" in g.log_lines.text()
    # Still listening and truthful.
    assert call(g.url, "/health")[0] == 503


def test_hang_watchdog_kills_and_restarts(guards, standin) -> None:
    g = guards(standin, hang_timeout=1.0, backoff=0.05)
    assert g.wait_serving()
    hung_pid = g.status()["worker_pid"]
    code, _, body = call(g.url, "/v1/completions", {"behave": "hang"}, t=60)
    assert code == 503 and json.loads(body)["error"]["code"] == "hang"
    assert not _alive(hung_pid)
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"prompt": "ok"})[0] == 200
    assert g.status()["last_cause"]["kind"] == "hang"


def _burst(url: str, n: int) -> list[tuple[int, Any]]:
    results: list[tuple[int, Any]] = [(0, None)] * n

    def one(i: int) -> None:
        try:
            code, _, body = call(url, "/v1/completions", {"prompt": f"p{i}"}, t=30)
            results[i] = (code, json.loads(body))
        except Exception as exc:  # a cut connection is exactly what we must not see
            results[i] = (-1, repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    return results


def test_burst_during_restart_gets_complete_answers(guards, standin, tmp_path) -> None:
    held = tmp_path / "held"
    g = guards(standin, env={"STANDIN_HOLD": str(held)}, backoff=0.05)
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"behave": "abort_before"})[0] == 503
    results = _burst(g.url, 20)  # the replacement is held at its start: no worker to be had
    (held / "open").touch()
    assert [c for c, _ in results] == [503] * 20, results
    for _, body in results:
        assert body["error"]["type"] in ("worker_unavailable", "worker_died")
    assert g.wait_serving()


def test_queue_timeout_lets_burst_wait_for_restart(guards, standin, tmp_path) -> None:
    held = tmp_path / "held"
    g = guards(standin, env={"STANDIN_HOLD": str(held)}, backoff=0.05, queue_timeout=60)
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"behave": "abort_before"})[0] == 503
    opener = threading.Timer(0.5, (held / "open").touch)  # not a bound: any delay works
    opener.start()
    results = _burst(g.url, 20)
    opener.join()
    assert [c for c, _ in results] == [200] * 20, results


def test_queue_timeout_retries_a_live_worker_with_a_full_backlog(guards, standin) -> None:
    """Connects that time out against a busy, live worker are retried, not answered with 502.

    The STAND-IN serves one request at a time with a listen backlog of 5; while it is busy for
    3 s, most of a 20-request burst cannot even connect (the kernel drops their SYNs and the
    guard's 2 s connect timeout expires). Nothing was sent yet, so retrying is safe.
    """
    g = guards(standin, queue_timeout=15)
    assert g.wait_serving()
    busy = threading.Thread(
        target=call, args=(g.url, "/v1/completions", {"behave": "busy", "secs": 3})
    )
    busy.start()
    time.sleep(0.3)
    results = _burst(g.url, 20)
    busy.join(30)
    assert [c for c, _ in results] == [200] * 20, results
    assert g.status()["restarts"] == 0


# ---- the guard as its own process: signals --------------------------------------------------


def _spawn_guard(standin: list[str], tmp_path: Path) -> tuple[subprocess.Popen, int, int, Path]:
    from pytest_metaloom.guard.worker import free_port

    port = free_port()
    child_file = tmp_path / "grandchild.pid"
    env = dict(os.environ, STANDIN_CHILD=str(child_file))
    log = open(tmp_path / "guard.log", "wb")
    proc = subprocess.Popen(
        guard_command(standin, port, log_dir=tmp_path / "logs"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if call(base, "/health", t=2)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        proc.kill()
        proc.wait(5)
        log_text = (tmp_path / "guard.log").read_text()
        pytest.fail("guard subprocess never became healthy: " + log_text)
    worker = json.loads(call(base, "/metaloom/status")[2])["worker_pid"]
    return proc, port, worker, child_file


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _cleanup(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_sigterm_to_guard_ends_worker_tree(standin, tmp_path) -> None:
    proc, _, worker, child_file = _spawn_guard(standin, tmp_path)
    grandchild = int(child_file.read_text())
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert _gone_within([worker, grandchild], 5)
        assert "received SIGTERM; stopping" in (tmp_path / "guard.log").read_text()
    finally:
        _cleanup([proc.pid, worker, grandchild])
        proc.wait(5)


def test_sigkill_to_guard_never_orphans_worker(standin, tmp_path) -> None:
    proc, _, worker, child_file = _spawn_guard(standin, tmp_path)
    grandchild = int(child_file.read_text())
    try:
        proc.kill()
        proc.wait(5)
        # PR_SET_PDEATHSIG kills it at once; the bound only keeps a broken build from hanging
        assert _gone_within([worker], 30.0), "worker outlived a SIGKILLed guard"
    finally:
        _cleanup([proc.pid, worker, grandchild])


# ---- the real mlx_lm.server behind the guard ----------------------------------------------

# `python -m mlx_lm server` imports mlx_lm.server as a module, so the injector can hook it.
MLX_SERVER = [sys.executable, "-m", "mlx_lm", "server"]


def chat(
    base: str, content: str, rid: str | None = None, stream: bool = False
) -> tuple[int, dict[str, Any] | bytes]:
    """A deterministic chat completion through the guard; returns status and parsed JSON."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0.0,
        "stream": stream,
    }
    headers = {"Content-Type": "application/json"}
    if rid:
        headers["X-Metaloom-Request-Id"] = rid
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if not stream else raw)
    finally:
        conn.close()


def cached_tokens(reply: dict[str, Any]) -> int:
    return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_real_server_stream_and_plain_through_guard(guards, model_dir) -> None:
    g = guards([*MLX_SERVER, "--model", str(model_dir)], ready_timeout=90)
    assert g.wait_serving()
    code, reply = chat(g.url, "tell me a story")
    assert code == 200 and reply["usage"]["completion_tokens"] >= 1
    code, raw = chat(g.url, "tell me a story", stream=True)
    assert code == 200
    events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and len(events) >= 2
    assert "choices" in json.loads(events[0])


@pytest.mark.parametrize("warmup", [False, True], ids=["no-warmup", "warmup"])
def test_real_server_seed_scenario_abort_then_cold_cache(
    guards, model_dir, tmp_path, warmup: bool
) -> None:
    """The seed issue: a command-buffer OOM aborts the server (mlx < 0.32 semantics) mid-request.

    Behind the guard, that request gets a 503 naming cmdbuf_oom and rc -6, the guard restarts the
    server, and the next request succeeds on a cold prompt cache. With the warm-up on, the fresh
    cache holds the warm-up's own one-token-completion entry, which shares only the BOS token
    with any later prompt, so exactly 1 token reads as cached.
    """
    from pytest_metaloom.inject.injector import bootstrap_env

    env = bootstrap_env(tmp_path / "inj", faults="1*cmdbuf_oom(abort)@request=boom")
    cmd = [*MLX_SERVER, "--model", str(model_dir)]
    g = guards(cmd, env=env, ready_timeout=90, backoff=0.05, warmup=warmup)
    assert g.wait_serving()
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    assert chat(g.url, prompt)[0] == 200
    code, warm = chat(g.url, prompt)
    assert code == 200 and cached_tokens(warm) > 0  # the cache was warm before the abort
    first_pid = g.status()["worker_pid"]

    code, reply = chat(g.url, "this request trips the OOM", rid="boom")
    assert code == 503, reply
    err = reply["error"]
    assert (err["type"], err["code"], err["exit_code"]) == ("worker_died", "cmdbuf_oom", -6)

    assert g.wait_serving()
    code, cold = chat(g.url, prompt)
    assert code == 200
    assert cached_tokens(cold) == (1 if warmup else 0)
    status = g.status()
    assert status["restarts"] == 1 and status["worker_pid"] != first_pid
    assert status["last_cause"]["kind"] == "cmdbuf_oom"
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in status["last_cause"]["line"]


# ---- live workers that fail without dying: wedged, or closing without a response -----------

from support import STANDINS, wait_until  # noqa: E402

WEDGING = [sys.executable, str(STANDINS / "wedging_worker.py")]
CLOSING = [sys.executable, str(STANDINS / "closing_worker.py")]
NON_OOM = "ValueError-free control failure: tokenizer state is inconsistent"


def _health(g: Guard) -> tuple[int, dict[str, Any]]:
    code, _, body = call(g.url, "/health")
    return code, json.loads(body)


def test_wedged_in_flight_gets_503_and_the_worker_is_replaced(guards, tmp_path) -> None:
    """The loop dies under a non-stream request: 503 naming the wedge, log cause=wedged, new pid."""
    starts = tmp_path / "starts"
    env = {"STANDIN_STARTS": str(starts), "STANDIN_HOLD": "1"}
    g = guards(WEDGING, env=env, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, headers, body = call(g.url, "/v1/completions", {"behave": "wedge", "prompt": "a"})
    assert code == 503, body
    err = json.loads(body)["error"]
    assert err["type"] == "worker_wedged" and err["code"] == "wedged"
    assert err["error_kind"] == "resource_limit"
    assert "Resource limit (499000) exceeded" in err["message"]
    assert headers.get("Retry-After")
    # The replacement is held at its start: the guard must not call anything serving meanwhile.
    code, health = _health(g)
    assert code == 503 and health["code"] == "wedged", health
    assert call(g.url, "/v1/completions", {"prompt": "b"})[0] == 503
    (starts / "open").touch()
    assert g.wait_serving()
    code, _, body = call(g.url, "/v1/completions", {"prompt": "c"})
    assert code == 200 and json.loads(body)["pid"] != first
    assert _health(g)[0] == 200
    status = g.status()
    assert status["restarts"] == 1 and status["last_cause"]["kind"] == "wedged"
    log = g.log_lines.text()
    assert f"worker pid={first} exited rc=-9 cause=wedged" in log
    assert "its /health answered 503" in log and "generation loop died" in log


def _answer_error(base: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """POST; the status and the structured error the client got (SSE event or JSON body)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
        resp = conn.getresponse()
        raw = resp.read().decode()
    finally:
        conn.close()
    texts = [line[5:].strip() for line in raw.splitlines() if line.startswith("data:")] or [raw]
    for text in texts:
        with contextlib.suppress(ValueError):
            data = json.loads(text)
            if isinstance(data, dict) and "error" in data:
                return resp.status, data["error"]
    return resp.status, None


def test_requests_ended_by_one_failure_hear_one_answer(guards, tmp_path) -> None:
    """A stream's loop dies of a non-memory error while a second request waits behind it. The
    guard proves the failure once (500 server_error, worker replaced); the waiting request,
    cut when the worker is ended, gets that same answer, not a word ("worker_wedged", 503)
    that depends on whether its connection closed before or after the proof."""
    gate, doomed_in, waiting_in = tmp_path / "gate", tmp_path / "doomed", tmp_path / "waiting"
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    doomed = {"stream": True, "events": 3, "behave": "wedge", "die_at": 1, "error": NON_OOM}
    doomed |= {"gate": str(gate), "queued": str(doomed_in)}
    waiting = {"stream": True, "events": 3, "notice": False, "queued": str(waiting_in)}
    answers: dict[str, Any] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        answers[name] = _answer_error(g.url, body)

    threads = [threading.Thread(target=send, args=("doomed", doomed), daemon=True)]
    threads[0].start()
    assert wait_until(doomed_in.exists)  # the loop has the doomed request first
    threads.append(threading.Thread(target=send, args=("waiting", waiting), daemon=True))
    threads[1].start()
    assert wait_until(waiting_in.exists)  # the second one waits behind it
    gate.touch()  # only now may the loop die
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads)
    code, affected = answers["doomed"]
    assert code == 200 and affected is not None, answers  # an error event in the started stream
    assert (affected["type"], affected["code"]) == ("server_error", "internal_error"), affected
    code, bystander = answers["waiting"]
    assert code == 500 and bystander == affected, answers
    assert g.wait_serving() and g.status()["worker_pid"] != first


def test_wedged_mid_stream_ends_with_error_event_and_done(guards) -> None:
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    body = {"stream": True, "events": 4, "behave": "wedge", "die_at": 2}
    code, events = stream_events(g.url, body)
    assert code == 200
    texts = [e for _, e in events]
    assert [json.loads(t)["i"] for t in texts[:2]] == [0, 1]
    err = json.loads(texts[2])["error"]
    assert err["code"] == "wedged" and err["type"] == "worker_wedged"
    assert texts[3:] == ["[DONE]"]
    assert g.wait_serving()
    assert g.status()["worker_pid"] != first
    assert g.status()["last_cause"]["kind"] == "wedged"


def test_stream_failing_before_any_event_gets_a_status_line(guards) -> None:
    """Nothing but the SSE head would have been sent: the guard held it, so a real 503 instead."""
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    body = {"stream": True, "events": 3, "behave": "wedge", "die_at": 0, "keepalive": False}
    code, _, raw = call(g.url, "/v1/chat/completions", body)
    assert code == 503, raw
    assert json.loads(raw)["error"]["code"] == "wedged"


def test_quiet_wedge_health_never_lies_and_requests_wait_for_the_new_worker(
    guards, tmp_path
) -> None:
    """The loop dies after answering: the guard's /health says 503, the next request is retried
    on the replacement (it never reached a loop), and the worker's own 404 never leaks out."""
    starts = tmp_path / "starts"
    env = {"STANDIN_STARTS": str(starts), "STANDIN_HOLD": "1"}
    g = guards(WEDGING, env=env, backoff=0.05, queue_timeout=60)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, _, _ = call(g.url, "/v1/completions", {"behave": "wedge_quietly"})
    assert code == 200  # that request was served; the loop died afterwards
    code, health = _health(g)
    assert code == 503, health  # the worker's own /health says 503: never a lying 200
    results: list[Any] = []
    waiter = threading.Thread(
        target=lambda: results.append(call(g.url, "/v1/completions", {"prompt": "q"}, t=90))
    )
    waiter.start()
    (starts / "open").touch()
    waiter.join(90)
    code, _, body = results[0]
    assert code == 200 and json.loads(body)["pid"] != first
    assert g.status()["last_cause"]["kind"] == "wedged"


def test_request_on_a_wedged_worker_without_queue_gets_503_not_404(guards) -> None:
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"behave": "wedge_quietly"})[0] == 200
    # No /health in between: the request itself meets the wedged loop.
    code, headers, body = call(g.url, "/v1/completions", {"prompt": "x"})
    assert code == 503, body
    err = json.loads(body)["error"]
    assert err["code"] == "wedged" and "generation thread died" in err["message"]
    assert headers.get("Retry-After")
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"prompt": "y"})[0] == 200


def test_non_memory_wedge_answers_500_and_still_replaces_the_worker(guards) -> None:
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, _, body = call(g.url, "/v1/completions", {"behave": "wedge", "error": NON_OOM})
    assert code == 500, body
    err = json.loads(body)["error"]
    assert err["code"] == "internal_error" and NON_OOM in err["message"]
    assert g.wait_serving()
    assert g.status()["worker_pid"] != first


def test_survived_oom_is_503_and_recycles_the_worker(guards) -> None:
    """The handler failed with an out-of-memory error but the loop lives (sequential path):
    503, and a fresh worker so the next request starts on empty caches."""
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, headers, body = call(g.url, "/v1/completions", {"behave": "fail"})
    assert code == 503, body
    err = json.loads(body)["error"]
    assert err["type"] == "worker_failed" and err["code"] == "resource_limit"
    assert headers.get("Retry-After")
    assert g.wait_serving()
    assert g.status()["worker_pid"] != first
    assert g.status()["last_cause"]["kind"] == "resource_limit"


def test_non_memory_request_error_is_500_and_the_worker_kept(guards) -> None:
    g = guards(WEDGING, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, _, body = call(g.url, "/v1/completions", {"behave": "fail", "error": NON_OOM})
    assert code == 500, body
    assert json.loads(body)["error"]["code"] == "internal_error"
    code, events = stream_events(g.url, {"stream": True, "behave": "fail", "error": NON_OOM})
    texts = [e for _, e in events]
    assert code == 200 and json.loads(texts[0])["error"]["code"] == "internal_error"
    assert texts[-1] == "[DONE]"
    assert g.status()["worker_pid"] == first and g.status()["restarts"] == 0


def test_watchdog_kills_a_hung_loop_but_not_a_busy_one(guards) -> None:
    """Both are silent past hang_timeout and neither could finish a one-token probe; only the
    hung one uses no CPU, so only it is probed and replaced."""
    g = guards(WEDGING, backoff=0.05, hang_timeout=0.5, probe_timeout=0.5)
    assert g.wait_serving()
    code, _, body = call(g.url, "/v1/completions", {"behave": "busy", "secs": 3})
    assert code == 200, body
    assert g.status()["restarts"] == 0
    code, _, body = call(g.url, "/v1/completions", {"behave": "hang"}, t=60)
    assert code == 503 and json.loads(body)["error"]["code"] == "hang", body
    assert "of a CPU before the probes" in g.status()["last_cause"]["line"]
    assert g.wait_serving()


def test_closing_worker_that_cannot_be_shown_healthy_gets_503(guards) -> None:
    """Every completion after the warm-up is closed unanswered, the probe's too: 503 with
    Retry-After, never 502, and the worker is replaced."""
    g = guards([*CLOSING, "--answer-first", "1"], backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, headers, body = call(g.url, "/v1/completions", {"prompt": "x"})
    assert code == 503, body
    err = json.loads(body)["error"]
    assert err["code"] == "wedged" and "closed without a response" in err["message"]
    assert headers.get("Retry-After")
    assert g.wait_serving()
    assert g.status()["worker_pid"] != first


def test_closing_worker_proven_healthy_gets_502_and_is_kept(guards) -> None:
    g = guards([*CLOSING, "--close-marked"], backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, headers, body = call(g.url, "/v1/completions", {"close": True})
    assert code == 502, body
    err = json.loads(body)["error"]
    assert err["code"] == "empty_response" and "healthy" in err["message"]
    assert "Retry-After" not in headers
    assert call(g.url, "/v1/completions", {"prompt": "x"})[0] == 200
    assert g.status()["worker_pid"] == first and g.status()["restarts"] == 0


# ---- the guard's /health is proven by completions, not relayed from the worker's ----------

LYING = [sys.executable, str(STANDINS / "lying_worker.py")]


def _posts(g: Guard) -> int:
    """POSTs the lying stand-in received so far (the guard's warm-up and probes included)."""
    code, _, body = call(g.url, "/standin/posts")
    assert code == 200, body
    return int(json.loads(body)["posts"])


def test_lying_health_with_a_stuck_loop_is_503_until_a_completion_finishes(guards) -> None:
    """The stand-in's loop sticks while its own /health keeps answering 200 and the watchdog is
    off. Once the warm-up's proof is past the window the guard's /health must prove the loop:
    503 naming why while it cannot, 200 again only after a completion finished."""
    g = guards(LYING, hang_timeout=0, proof_window=0.5, probe_timeout=1.0)
    assert g.wait_serving()
    assert _health(g)[0] == 200
    stuck: list[Any] = []
    client = threading.Thread(
        target=lambda: stuck.append(call(g.url, "/v1/completions", {"behave": "stick"}, t=120))
    )
    client.start()
    seen: list[tuple[int, dict[str, Any]]] = []
    wait_until(lambda: seen.append(_health(g)) or seen[-1][0] != 200)
    code, health = seen[-1]
    assert code == 503, health
    assert (health["state"], health["code"]) == ("unverified", "worker_unhealthy")
    assert "not proven serving" in health["reason"]
    assert "its /health answered 200" in health["reason"]
    assert "a one-token completion did not answer within 1s" in health["reason"]
    assert _health(g)[0] == 503  # still stuck, still not 200
    assert g.status()["restarts"] == 0  # unproven is not proven wedged: the worker is kept
    assert call(g.url, "/standin/release")[0] == 200
    client.join(60)
    assert stuck and stuck[0][0] == 200
    code, health = _health(g)
    assert code == 200, health
    assert health["proven_by"] in ("a relayed completion", "a one-token completion the guard sent")


def test_lying_health_after_the_loop_died_quietly_is_503_and_the_worker_replaced(guards) -> None:
    """Completions get 500 (no word about the loop) while the worker's /health says 200: the
    guard's /health must not relay that 200; it proves the worker wedged and replaces it."""
    g = guards(LYING, backoff=0.05)
    assert g.wait_serving()
    first = g.status()["worker_pid"]
    code, _, body = call(g.url, "/v1/completions", {"behave": "break"})
    assert code == 500, body  # the worker's own answer, relayed
    code, health = _health(g)
    assert code == 503, health
    assert health["code"] == "wedged", health
    assert "a one-token completion answered 500" in health["reason"]
    assert g.wait_serving()
    code, health = _health(g)
    assert code == 200 and health["worker_pid"] != first, health
    assert health["proven_by"] == "the warm-up completion"
    assert g.status()["last_cause"]["kind"] == "wedged"


def test_lying_health_with_completions_answered_404_stays_503(guards) -> None:
    """A 404 without the wedge words proves no wedge, but nothing proves serving either."""
    g = guards(LYING, backoff=0.05)
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"behave": "break", "code": 404})[0] == 404
    for _ in range(2):
        code, health = _health(g)
        assert code == 503 and health["code"] == "worker_unhealthy", health
        assert "a one-token completion answered 404" in health["reason"]
        assert "answered 404 to POST /v1/completions" in health["reason"]
    assert g.status()["restarts"] == 0


def test_health_is_cheap_while_proven_and_a_doubt_costs_one_shared_diagnosis(guards) -> None:
    """Polls after a finished completion send the worker no completion; after a failed one,
    a burst of concurrent polls shares one diagnosis (one probe), and the polls after it none.
    (proof_window=0: proofs expire only by failures, so no clock is involved.)"""
    g = guards(LYING, proof_window=0)
    assert g.wait_serving()
    assert call(g.url, "/v1/completions", {"prompt": "x"})[0] == 200
    before = _posts(g)
    polled = [_health(g) for _ in range(20)]
    assert [code for code, _ in polled] == [200] * 20
    assert _posts(g) == before
    assert call(g.url, "/v1/completions", {"behave": "fail"})[0] == 500
    failed = _posts(g)
    assert failed == before + 1
    codes: list[int] = []
    polls = [threading.Thread(target=lambda: codes.append(_health(g)[0])) for _ in range(8)]
    for t in polls:
        t.start()
    for t in polls:
        t.join(60)
    assert codes == [200] * 8
    assert _posts(g) == failed + 1  # one probe for all eight
    later = [_health(g) for _ in range(10)]
    assert [code for code, _ in later] == [200] * 10
    assert _posts(g) == failed + 1
    assert {h.get("proven_by") for _, h in polled} == {"a relayed completion"}
    assert {h.get("proven_by") for _, h in later} == {"a one-token completion the guard sent"}


# ---- the matrix through the guard: stock rows that wedge the worker ------------------------


@pytest.mark.timeout(900)
def test_matrix_wedging_rows_on_stock_are_graceful_through_the_guard(pytester) -> None:
    """Stock mlx-lm 0.32.2 wedges on batched synchronous and deferred errors. Behind the guard
    each row must be graceful: the affected request answered (503, or 500 for the non-memory
    control), the worker replaced (cache empty by construction), /health never 200 for the
    wedged worker, recovery 200."""
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        "--metaloom-guard",
        f"--metaloom-report={report}",
        "--metaloom-paths=batched",
        "--metaloom-semantics=sync,deferred",
        "--metaloom-faults=resource_limit,cmdbuf_oom,runtime_error",
        "-k",
        "not cycles",
    )
    rows = json.loads(report.read_text())["scenarios"]
    assert {r["semantics"] for r in rows} == {"sync", "deferred"}, rows
    for row in rows:
        facts = row["facts"]
        assert row["outcome"] == "graceful", row
        assert row["guard"] is True and facts["fired"]
        expected = 500 if row["fault"] == "runtime_error" else 503
        if facts["stream"] and facts["stream_started"]:
            # the stream had begun before the failure: its answer is an SSE error event,
            # then [DONE], under the 200 the client already has
            assert facts["status"] == 200 and facts["sse_error_event"] and facts["sse_done"], row
        else:
            assert facts["status"] == expected, row
        assert facts["worker_restarted"], row  # the wedged worker was replaced
        assert facts["health_after_fault"] == 503, row  # never a lying 200
        assert set(facts["recovery_statuses"]) == {200}, row
    assert result.ret == pytest.ExitCode.OK
