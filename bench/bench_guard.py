"""Benchmark metaloom-guard side by side with a direct connection; prints ratios.

    .venv/bin/python bench/bench_guard.py [--quick]

Measures, in one run:
  1. streaming throughput through the guard vs direct to the same worker (real mlx_lm.server)
  2. added latency per non-stream request, median (STAND-IN worker: the latency floor)
  3. worker death -> in-flight client's 503, median (STAND-IN worker that aborts on demand)
  4. worker death -> serving again vs a bare server start (real mlx_lm.server, cold start)
The guard always runs as its own process (``guard_command``), as in production.
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
def guard_proc(worker: list[str], log_dir: Path, **opts: Any) -> Iterator[int]:
    """A guard subprocess in front of ``worker``; yields its port; always cleaned up."""
    port = free_port()
    argv = guard_command(worker, port, log_dir=log_dir, quiet=True, **opts)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def bench_throughput(model: Path, tmp: Path, rounds: int) -> tuple[float, float]:
    with guard_proc([*MLX_SERVER, "--model", str(model)], tmp / "tp") as gport:
        wport = status(gport)["worker_port"]
        stream_rate(wport, 32)  # warm both paths' code and the prompt cache equally
        direct, guarded = [], []
        for _ in range(rounds):  # interleaved, so drift hits both sides alike
            direct.append(stream_rate(wport, 256))
            guarded.append(stream_rate(gport, 256))
    return statistics.median(direct), statistics.median(guarded)


def bench_latency(standin: list[str], tmp: Path, n: int) -> tuple[float, float]:
    with guard_proc(standin, tmp / "lat", warmup=False) as gport:
        wport = status(gport)["worker_port"]
        direct, guarded = [], []
        for _ in range(n):
            for port, out in ((wport, direct), (gport, guarded)):
                t0 = time.perf_counter()
                request(port, "POST", "/v1/completions", {"prompt": "x"})
                out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(direct), statistics.median(guarded)


def bench_death_to_503(standin: list[str], tmp: Path, n: int) -> float:
    """ms from the worker's own death timestamp to the in-flight client's 503."""
    delays = []
    with guard_proc(standin, tmp / "d503", warmup=False, max_restarts=n + 1, backoff=0.01) as gp:
        for _ in range(n):
            wait_until(lambda: request(gp, "GET", "/health", timeout=2)[0] == 200, 30)
            code, _ = request(gp, "POST", "/v1/completions", {"die_in": 0.2})
            got = time.time()
            assert code == 503, code
            log = Path(status(gp)["worker_log"]).read_text()
            death = float(log.split("death_at=")[1].split()[0])
            delays.append((got - death) * 1000)
    return statistics.median(delays)


def bench_restart(model: Path, tmp: Path, rounds: int) -> tuple[float, float]:
    """Seconds to a first successful completion: bare cold start vs guard after a SIGABRT."""
    body = {"prompt": "hello", "max_tokens": 1}
    bare = []
    for i in range(rounds):
        port = free_port()
        cmd = [*MLX_SERVER, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
        log = open(tmp / f"bare{i}.log", "wb")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda p=port: request(p, "POST", "/v1/completions", body)[0] == 200, 120)
            bare.append(time.monotonic() - t0)
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()
    guarded = []
    opts = {"max_restarts": rounds + 1, "backoff": 0.01}
    with guard_proc([*MLX_SERVER, "--model", str(model)], tmp / "rs", **opts) as gp:
        for _ in range(rounds):
            wait_until(lambda: request(gp, "GET", "/health", timeout=2)[0] == 200, 120)
            pid = status(gp)["worker_pid"]
            t0 = time.monotonic()
            os.kill(pid, signal.SIGABRT)  # a real abort of the real server process
            wait_until(lambda: request(gp, "POST", "/v1/completions", body)[0] == 200, 120)
            guarded.append(time.monotonic() - t0)
    return statistics.median(bare), statistics.median(guarded)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    args = ap.parse_args()
    from pytest_metaloom.model import ModelSpec, build_tiny_model

    model = build_tiny_model(ModelSpec())
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as d:
        tmp = Path(d)
        script = tmp / "standin_worker.py"
        script.write_text(STANDIN)
        standin = [sys.executable, str(script), "{port}"]
        q = args.quick
        tp_d, tp_g = bench_throughput(model, tmp, 3 if q else 7)
        lat_d, lat_g = bench_latency(standin, tmp, 50 if q else 300)
        d503 = bench_death_to_503(standin, tmp, 5 if q else 15)
        rs_b, rs_g = bench_restart(model, tmp, 2 if q else 4)
    rows = [
        ("stream throughput (events/s)", f"{tp_d:.1f}", f"{tp_g:.1f}", f"{tp_g / tp_d:.3f}",
         ">= 0.95"),
        ("non-stream latency, median (ms)", f"{lat_d:.2f}", f"{lat_g:.2f}",
         f"+{lat_g - lat_d:.2f} ms", "< +2 ms"),
        ("death -> in-flight 503, median (ms)", "-", f"{d503:.1f}", "-", "< 100 ms"),
        ("to serving: bare start vs restart (s)", f"{rs_b:.2f}", f"{rs_g:.2f}",
         f"{rs_g / rs_b:.2f}x", "<= 1.5x"),
    ]  # fmt: skip
    head = ("measure", "direct/bare", "guard", "ratio/delta", "target")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
