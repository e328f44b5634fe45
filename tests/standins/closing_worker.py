"""STAND-IN worker that closes connections without a response (NOT mlx_lm.server).

A real server does this when a request's handler dies (mlx_lm.server's sequential path, or any
server whose handler thread raises before its status line). ``/health`` always answers 200.

  --answer-first N   answer the first N POSTs (the guard's warm-up), close every later one
  --close-marked     close only POSTs whose JSON has ``"close": true``; answer the rest
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer-first", type=int, default=None)
    parser.add_argument("--close-marked", action="store_true")
    args = parser.parse_args()
    lock = threading.Lock()
    posts = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def _json(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._json(200, {"status": "ok"})

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            with lock:
                posts[0] += 1
                n = posts[0]
            close = bool(req.get("close")) if args.close_marked else False
            if args.answer_first is not None and n > args.answer_first:
                close = True
            if close:
                self.close_connection = True
                return  # nothing written: the socket closes with no status line
            self._json(200, {"pid": os.getpid(), "n": n})

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
