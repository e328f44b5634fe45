"""STAND-IN worker whose /health lies (NOT mlx_lm.server).

Stock ``mlx_lm.server`` answers ``/health`` from its HTTP threads, so a generation loop stuck
inside an evaluation leaves it answering 200; a server whose loop died without saying so does
the same. This stand-in does exactly that: ``/health`` answers 200 ``{"status": "ok"}`` whatever
its one generation loop thread does. It copies the real server's shape (a loop thread fed by a
queue, HTTP/1.0 handler threads that wait on it, close-delimited JSON bodies).

Per completion (JSON field ``behave``):
  stick   the loop blocks (no CPU) on this request: it and every later completion wait until
          ``GET /standin/release``
  break   the loop dies quietly: this and every later completion are answered ``code``
          (default 500) ``{"error": "internal server error"}``, no word about the loop
  fail    this one completion is answered 500; the loop lives
otherwise the loop answers 200 ``{"pid": ..., "n": ...}``.
``GET /standin/posts`` answers how many POSTs arrived (the guard's warm-up and probes included).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STUCK_BOUND = 300.0  # a stuck loop and its waiting handlers give up after this (no leaks)


class Loop:
    """One generation thread; each handler waits on its own reply queue."""

    def __init__(self) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.release = threading.Event()
        self.broken: int | None = None  # the status every completion gets once the loop died
        self.served = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            reply, req = self.requests.get()
            behave = req.get("behave", "")
            if behave == "stick":
                self.release.wait(STUCK_BOUND)
            if behave == "break":
                self.broken = int(req.get("code", 500))
                reply.put(None)
                return  # the loop is gone; nothing says so
            self.served += 1
            reply.put({"pid": os.getpid(), "n": self.served})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    loop = Loop()
    lock = threading.Lock()
    posts = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def _plain(self, code: int, obj: dict) -> None:
            self.send_response(code)  # no Content-Length: the body ends at the close
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(obj).encode())

        def do_GET(self) -> None:
            if self.path == "/health":
                self._plain(200, {"status": "ok"})  # the lie: the loop is never asked
            elif self.path == "/standin/posts":
                with lock:
                    self._plain(200, {"posts": posts[0]})
            elif self.path == "/standin/release":
                loop.release.set()
                self._plain(200, {"released": True})
            else:
                self._plain(404, {"error": "not found"})

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n) or b"{}")
            with lock:
                posts[0] += 1
            if loop.broken is not None:
                self._plain(loop.broken, {"error": "internal server error"})
                return
            if req.get("behave") == "fail":
                self._plain(500, {"error": "internal server error"})
                return
            reply: queue.Queue = queue.Queue()
            loop.requests.put((reply, req))
            try:
                item = reply.get(timeout=STUCK_BOUND)
            except queue.Empty:
                self.close_connection = True
                return
            if item is None:
                self._plain(loop.broken or 500, {"error": "internal server error"})
                return
            self._plain(200, item)

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
