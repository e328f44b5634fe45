"""STAND-IN worker that wedges like mlx_lm.server 0.32.2 (NOT mlx_lm.server).

It exists because the real server only wedges under real memory pressure. It copies the real
server's shape: one generation loop thread fed by a queue, HTTP/1.0 handler threads that wait
on it, and after the loop dies: alive, ``/health`` 503 ``{"status": "unavailable"}``, every
completion 404 ``{"error": "generation thread died"}``, the loop's death logged as
``ERROR - mlx_lm.server generation thread died: <error>`` with its traceback.

Per request (JSON field ``behave``):
  wedge          the loop dies of ``error`` while serving it (non-stream: closed unanswered;
                 stream: 200 head, ``events`` events, then cut)
  wedge_quietly  answered 200, then the loop dies of ``error`` (the next request finds it wedged)
  fail           the request fails with ``error`` in its handler; the loop lives (sequential path)
  hang           the loop blocks without using CPU
  busy           the loop computes for ``secs`` seconds (CPU), then answers
Streams start with a keep-alive comment (as mlx_lm.server's prompt progress does) unless
``"keepalive": false``. Ordering by evidence, not by sleeps: ``"queued": PATH`` is touched once
the request is in the loop's queue; ``"gate": PATH`` makes a ``wedge`` wait (bounded) for PATH
before its loop dies; ``"notice": false`` makes a waiting handler never look at the loop's
state, so only the worker's end ends it (a request stuck behind a dead loop).
Environment: ``STANDIN_STARTS=DIR`` records each start; with ``STANDIN_HOLD=1`` every start after
the first waits (bounded) for ``DIR/open`` before listening, so a test can watch a restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OOM = "[metal::malloc] Resource limit (499000) exceeded."
logging.basicConfig(stream=sys.stderr, format="%(asctime)s - %(levelname)s - %(message)s")


class Loop:
    """The single generation thread; handlers wait on per-request queues like mlx_lm.server."""

    def __init__(self) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.failed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def available(self) -> bool:
        return self.thread.is_alive() and not self.failed

    def _run(self) -> None:
        try:
            while True:
                rq, req = self.requests.get()
                self._serve(rq, req)
        except Exception as exc:
            logging.exception(f"mlx_lm.server generation thread died: {exc}")
            self.failed = True

    def _serve(self, rq: queue.Queue, req: dict) -> None:
        behave = req.get("behave", "")
        rq.put("ctx")
        if behave == "hang":
            threading.Event().wait(600)
        if behave == "busy":
            end = time.monotonic() + float(req.get("secs", 1.0))
            while time.monotonic() < end:
                sum(i * i for i in range(10_000))
        n = int(req.get("events", 3)) if req.get("stream") else 1
        for i in range(n):
            if behave == "wedge" and i == int(req.get("die_at", 0)):
                gate = req.get("gate")
                deadline = time.monotonic() + 60
                while gate and not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.02)
                raise RuntimeError(req.get("error", OOM))
            rq.put({"i": i, "pid": os.getpid(), "echo": req.get("prompt")})
        if behave == "wedge_quietly":
            # dead to /health before the answer ends, so a test that asks after it is ordered
            self.failed = True
        rq.put(None)
        if behave == "wedge_quietly":
            raise RuntimeError(req.get("error", OOM))

    def generate(self, req: dict):
        if not self.available():
            raise RuntimeError("generation thread died")
        rq: queue.Queue = queue.Queue()
        self.requests.put((rq, req))
        if req.get("queued"):
            Path(req["queued"]).touch()
        notice = req.get("notice", True)
        self._next(rq, notice)  # ctx

        def items():
            while (item := self._next(rq, notice)) is not None:
                yield item

        return items()

    def _next(self, rq: queue.Queue, notice: bool = True):
        if not notice:
            return rq.get(timeout=300)  # only the worker's end (or this bound) stops the wait
        while True:
            try:
                return rq.get(timeout=1.0)
            except queue.Empty:
                if not self.available():
                    raise RuntimeError("generation thread died") from None


def make_handler(loop: Loop) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args: object) -> None:
            pass

        def _plain(self, code: int, obj: dict) -> None:
            # like mlx_lm.server: no Content-Length, the body ends at the close
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(obj).encode())

        def do_GET(self) -> None:
            if self.path == "/health":
                ok = loop.available()
                self._plain(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
            else:
                self._plain(404, {"error": "not found"})

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n) or b"{}")
            if req.get("behave") == "fail" and not req.get("stream"):
                raise RuntimeError(req.get("error", OOM))
            try:
                items = loop.generate(req)
            except Exception as exc:
                self._plain(404, {"error": str(exc)})
                return
            if not req.get("stream"):
                self.send_response(200)  # buffered until end_headers, as in mlx_lm.server
                self.send_header("Content-Type", "application/json")
                last = list(items)[-1]
                self.end_headers()
                self.wfile.write(json.dumps(last).encode())
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if req.get("keepalive", True):
                self.wfile.write(b": keepalive 0/1\n\n")
                self.wfile.flush()
            if req.get("behave") == "fail":
                raise RuntimeError(req.get("error", OOM))
            for item in items:
                self.wfile.write(b"data: " + json.dumps(item).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


def hold_if_asked() -> None:
    """With STANDIN_HOLD, a restarted worker waits (bounded) for the test to open the gate."""
    starts = os.environ.get("STANDIN_STARTS")
    if not starts:
        return
    folder = Path(starts)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = list(folder.glob("started-*"))
    (folder / f"started-{os.getpid()}").touch()
    if earlier and os.environ.get("STANDIN_HOLD"):
        deadline = time.monotonic() + 120
        while not (folder / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    hold_if_asked()
    loop = Loop()
    ThreadingHTTPServer((args.host, args.port), make_handler(loop)).serve_forever()


if __name__ == "__main__":
    main()
