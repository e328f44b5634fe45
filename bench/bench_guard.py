"""Benchmark metaloom-guard side by side with a direct connection; prints ratios.

    .venv/bin/python bench/bench_guard.py [--quick]

Measures, in one run:
  1. streaming throughput through the guard vs direct to the same worker (real mlx_lm.server)
  2. added latency per non-stream request, median (STAND-IN worker: the latency floor)
  3. worker death -> in-flight client's 503, median (STAND-IN worker that aborts on demand)
  4. worker death -> serving again vs a bare server start (real mlx_lm.server, cold start)
  5. worker wedged -> detected (the affected request's 503) -> serving again, vs a bare start
     (real mlx_lm.server 0.32 with an injected synchronous error in its batched generation loop:
     the process stays alive, /health 503, completions 404 ``generation thread died``)
The guard always runs as its own process (``guard_command``), as in production.

The machine is shared, so load drifts by tens of percent within seconds. Ratios are therefore
taken per *pair* of adjacent rounds (direct then guard, or guard then direct, alternating so
neither side always runs second), and the report gives the median pair ratio with its spread
(quartiles and extremes), not a ratio of two medians measured at different times.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from pytest_metaloom.guard import guard_command
from pytest_metaloom.guard.worker import free_port

MLX_SERVER = [sys.executable, "-m", "mlx_lm", "server"]

# STAND-IN worker: answers instantly; {"die_in": S} writes its death time to stderr then aborts.
STANDIN = textwrap.dedent(
    """
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        def log_message(self, *a):
            pass
        def _ok(self):
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            self._ok()
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if "die_in" in req:
                time.sleep(req["die_in"])
                sys.stderr.write("death_at=%r\\n" % time.time())
                sys.stderr.flush()
                os.abort()
            self._ok()

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def request(
    port: int, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(pred: Any, timeout: float, step: float = 0.02) -> float:
    """Seconds until ``pred()`` is true; raises TimeoutError past ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(step)
    raise TimeoutError(f"condition not met within {timeout}s")


@contextmanager
def guard_proc(
    worker: list[str], log_dir: Path, env: dict[str, str] | None = None, **opts: Any
) -> Iterator[int]:
    """A guard subprocess in front of ``worker``; yields its port; always cleaned up."""
    port = free_port()
    argv = guard_command(worker, port, log_dir=log_dir, quiet=True, **opts)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_until(lambda: request(port, "GET", "/health", timeout=2)[0] == 200, 120)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def status(port: int) -> dict[str, Any]:
    return json.loads(request(port, "GET", "/metaloom/status")[1])


def stream_rate(port: int, max_tokens: int) -> float:
    """SSE events per second for one streamed chat completion."""
    body = {
        "messages": [{"role": "user", "content": "count to a thousand"}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body))
        resp = conn.getresponse()
        n = 0
        while line := resp.fp.readline():
            n += line.startswith(b"data: ")
        return n / (time.perf_counter() - t0)
    finally:
        conn.close()


class Paired:
    """Direct/bare and guard samples taken in adjacent pairs; summarises the pair ratios."""

    def __init__(self) -> None:
        self.base: list[float] = []
        self.guard: list[float] = []

    def add(self, base: float, guard: float) -> None:
        self.base.append(base)
        self.guard.append(guard)

    def ratios(self) -> list[float]:
        return [g / b for b, g in zip(self.base, self.guard, strict=True)]

    def spread(self) -> str:
        """'median [q1-q3] (min-max)' of the pair ratios."""
        r = sorted(self.ratios())
        q1, q2, q3 = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else r * 3
        return f"{q2:.3f} [{q1:.3f}-{q3:.3f}] ({r[0]:.3f}-{r[-1]:.3f}) n={len(r)}"


def alternate(i: int, base: Any, guard: Any) -> tuple[float, float]:
    """Run one pair, base first on even rounds and guard first on odd ones (A/B, B/A, ...)."""
    if i % 2 == 0:
        b = base()
        return b, guard()
    g = guard()
    return base(), g


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def bench_throughput(model: Path, tmp: Path, rounds: int, tokens: int) -> tuple[Paired, float]:
    """Pair ratios of events/s, and the guard's CPU as a share of the worker's on guarded streams.

    The CPU share does not depend on machine load: it bounds what the relay can cost a saturated
    machine, which tells a real regression from noise in the pair ratios.
    """
    out = Paired()
    with guard_proc([*MLX_SERVER, "--model", str(model)], tmp / "tp") as gport:
        st = status(gport)
        wport = st["worker_port"]
        guard_p, worker_p = psutil.Process(st["guard_pid"]), psutil.Process(st["worker_pid"])
        cpu = {"guard": 0.0, "worker": 0.0}

        def guarded() -> float:
            g0, w0 = cpu_seconds(guard_p), cpu_seconds(worker_p)
            rate = stream_rate(gport, tokens)
            cpu["guard"] += cpu_seconds(guard_p) - g0
            cpu["worker"] += cpu_seconds(worker_p) - w0
            return rate

        for port in (wport, gport):  # warm both paths' code and the prompt cache equally
            stream_rate(port, 32)
        for i in range(rounds):
            out.add(*alternate(i, lambda: stream_rate(wport, tokens), guarded))
    return out, cpu["guard"] / max(cpu["worker"], 1e-9)


def bench_latency(standin: list[str], tmp: Path, n: int) -> tuple[float, float, float]:
    """Median direct and guard request times (ms) and the median added time per adjacent pair."""

    def timed(port: int) -> float:
        t0 = time.perf_counter()
        request(port, "POST", "/v1/completions", {"prompt": "x"})
        return (time.perf_counter() - t0) * 1000

    out = Paired()
    with guard_proc(standin, tmp / "lat", warmup=False) as gport:
        wport = status(gport)["worker_port"]
        for i in range(n):
            out.add(*alternate(i, lambda: timed(wport), lambda: timed(gport)))
    added = statistics.median(g - b for b, g in zip(out.base, out.guard, strict=True))
    return statistics.median(out.base), statistics.median(out.guard), added


def bench_death_to_503(standin: list[str], tmp: Path, n: int) -> float:
    """ms from the worker's own death timestamp to the in-flight client's 503."""
    delays = []
    with guard_proc(standin, tmp / "d503", warmup=False, max_restarts=n + 1, backoff=0.01) as gp:
        for _ in range(n):
            wait_until(lambda: request(gp, "GET", "/health", timeout=2)[0] == 200, 30)
            # The dying worker's log, named now: by the time the 503 arrives the guard may
            # already have started the next worker, and status() names that one's log.
            log_path = Path(status(gp)["worker_log"])
            code, _ = request(gp, "POST", "/v1/completions", {"die_in": 0.2})
            got = time.time()
            assert code == 503, code
            log = log_path.read_text()
            death = float(log.split("death_at=")[1].split()[0])
            delays.append((got - death) * 1000)
    return statistics.median(delays)


def bare_start(model: Path, log_path: Path, body: dict[str, Any]) -> float:
    """Seconds from spawning a bare mlx_lm.server to its first successful completion."""
    port = free_port()
    cmd = [*MLX_SERVER, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: request(port, "POST", "/v1/completions", body)[0] == 200, 120)
            return time.monotonic() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def guard_restart(gport: int, body: dict[str, Any]) -> float:
    """Seconds from a real SIGABRT of the guard's worker to a successful completion through it."""
    wait_until(lambda: request(gport, "GET", "/health", timeout=2)[0] == 200, 120)
    pid = status(gport)["worker_pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGABRT)  # a real abort of the real server process
    wait_until(lambda: request(gport, "POST", "/v1/completions", body)[0] == 200, 120)
    return time.monotonic() - t0


def bench_restart(model: Path, tmp: Path, rounds: int) -> Paired:
    """Bare cold starts and guard restarts, alternated so machine load hits both alike."""
    body = {"prompt": "hello", "max_tokens": 1}
    out = Paired()
    # The first restart in a window is immediate by default; later ones back off on purpose (a
    # crash loop). Pairs put guard rounds back to back, so turn the deliberate delay off to time
    # the restart itself.
    opts = {"max_restarts": rounds + 1, "restart_window": 3600, "backoff": 0}
    with guard_proc([*MLX_SERVER, "--model", str(model)], tmp / "rs", **opts) as gp:
        for i in range(rounds):
            out.add(
                *alternate(
                    i,
                    lambda i=i: bare_start(model, tmp / f"bare{i}.log", body),
                    lambda: guard_restart(gp, body),
                )
            )
    return out


def tagged(port: int, rid: str, body: dict[str, Any]) -> int:
    """Status of one completion carrying the injector's request tag."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "application/json", "X-Metaloom-Request-Id": rid}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def guard_wedge(gport: int, injector: Any, rid: str, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the affected request's 503, seconds to the next 200) after a real wedge.

    The injected error kills mlx_lm.server's batched generation loop and leaves the process
    alive; the guard must notice from the worker's answers and replace it.
    """
    wait_until(lambda: request(gport, "GET", "/health", timeout=2)[0] == 200, 120)
    injector.arm(f"1*resource_limit@path=batched,site=prefill,request={rid}")
    t0 = time.monotonic()
    code = tagged(gport, rid, {**body, "prompt": f"wedge me {rid}"})
    detected = time.monotonic() - t0
    assert code == 503, code
    wait_until(lambda: request(gport, "POST", "/v1/completions", body)[0] == 200, 120)
    return detected, time.monotonic() - t0


def bench_wedge(model: Path, tmp: Path, rounds: int) -> tuple[Paired, list[float]]:
    """Bare cold starts and wedge-to-serving times through the guard, alternated in pairs."""
    from pytest_metaloom.inject.injector import Injector, bootstrap_env

    body = {"prompt": "hello", "max_tokens": 1}
    env = bootstrap_env(tmp / "wedge-inj")
    injector = Injector(env["METALOOM_CONTROL"], env["METALOOM_EVENTS"])
    out = Paired()
    detected: list[float] = []
    opts = {"max_restarts": rounds + 1, "restart_window": 3600, "backoff": 0}
    with guard_proc([*MLX_SERVER, "--model", str(model)], tmp / "wg", env=env, **opts) as gp:

        def wedge(i: int) -> float:
            d, total = guard_wedge(gp, injector, f"wedge-{i}", body)
            detected.append(d)
            return total

        for i in range(rounds):
            out.add(
                *alternate(
                    i,
                    lambda i=i: bare_start(model, tmp / f"bare-w{i}.log", body),
                    lambda i=i: wedge(i),
                )
            )
    return out, detected


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    # Many short pairs beat few long ones: the two halves of a pair run closer together in time,
    # so a burst of load from elsewhere on the machine is likelier to hit both.
    ap.add_argument("--tokens", type=int, default=128, help="tokens per streamed completion")
    ap.add_argument("--stream-rounds", type=int, default=0, help="stream pairs (default 60)")
    ap.add_argument("--restart-rounds", type=int, default=0, help="restart pairs (default 6)")
    ap.add_argument("--only-wedge", action="store_true", help="measure only the wedge rows")
    args = ap.parse_args()
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    model = build_tiny_model(ModelSpec())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as d:
        tmp = Path(d)
        script = tmp / "standin_worker.py"
        script.write_text(STANDIN)
        standin = [sys.executable, str(script), "{port}"]
        q = args.quick
        rounds = args.restart_rounds or (2 if q else 6)
        rows = []
        med = statistics.median
        if not args.only_wedge:
            tp, cpu_share = bench_throughput(
                model, tmp, args.stream_rounds or (10 if q else 60), args.tokens
            )
            lat_d, lat_g, lat_added = bench_latency(standin, tmp, 50 if q else 300)
            d503 = bench_death_to_503(standin, tmp, 5 if q else 15)
            rs = bench_restart(model, tmp, rounds)
            rows += [
                ("stream throughput (events/s)", f"{med(tp.base):.1f}", f"{med(tp.guard):.1f}",
                 tp.spread(), ">= 0.95"),
                ("  guard CPU / worker CPU, streaming", "-", "-", f"{cpu_share:.2%}", "< 5%"),
                ("non-stream latency, median (ms)", f"{lat_d:.2f}", f"{lat_g:.2f}",
                 f"+{lat_added:.2f} ms (pair median)", "< +2 ms"),
                ("death -> in-flight 503, median (ms)", "-", f"{d503:.1f}", "-", "< 100 ms"),
                ("to serving: bare start vs restart (s)", f"{med(rs.base):.2f}",
                 f"{med(rs.guard):.2f}", rs.spread(), "<= 1.5"),
            ]  # fmt: skip
        wg, detected = bench_wedge(model, tmp, rounds)
        rows += [
            ("wedge -> affected request's 503 (s)", "-", f"{med(detected):.2f}", "-", "-"),
            ("to serving: bare start vs wedge (s)", f"{med(wg.base):.2f}", f"{med(wg.guard):.2f}",
             wg.spread(), "<= 1.5"),
        ]  # fmt: skip
    head = ("measure", "direct/bare", "guard", "ratio: median [q1-q3] (min-max) / delta", "target")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    # Shared machine: say how loaded it was, since the pair spread depends on it.
    cores = os.cpu_count() or 1
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on {cores} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
