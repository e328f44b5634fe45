"""A stand-in HTTP server for process-control tests (NOT mlx_lm.server).

It exists to produce behaviours the real server cannot be made to show on demand:
ignoring SIGTERM, owning children in other sessions, crashing or stalling at start.
It speaks just enough of mlx_lm.server's API: GET /health and POST completions.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-child", action="store_true", help="child in its own session")
    parser.add_argument("--exit-at-start", type=int, default=None)
    parser.add_argument("--abort-at-start", action="store_true")
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--pid-file", default=None)
    args = parser.parse_args()

    if args.exit_at_start is not None:
        print("stand-in: failing at start on purpose", file=sys.stderr, flush=True)
        sys.exit(args.exit_at_start)
    if args.abort_at_start:
        print("stand-in: aborting at start on purpose", file=sys.stderr, flush=True)
        os.abort()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if args.spawn_child:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal,time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); time.sleep(600)",
            ],
            start_new_session=True,
        )
        pids.append(child.pid)
    if args.pid_file:
        with open(args.pid_file, "a") as handle:
            handle.write("".join(f"{pid}\n" for pid in pids))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"status": "ok"})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if args.never_ready:
                self._send(500, {"error": "stand-in never becomes ready"})
            else:
                self._send(200, {"choices": [{"message": {"content": "x"}}]})

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    time.sleep(0)


if __name__ == "__main__":
    main()
