"""A stand-in headroom helper (NOT the real one: it holds no device memory).

It speaks the helper's JSON-lines protocol over a pretend device of ``--total`` bytes,
and writes what it "holds" to ``--state`` after every change, ending with
``released`` when it exits. Tests read that file to see that the harness squeezed and
always let go: on teardown, Ctrl-C, SIGTERM, or when the harness itself is killed
(stdin closes).
"""

import argparse
import json
import os
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--total", type=int, default=80 << 30)
    parser.add_argument("--fail-start", action="store_true", help="refuse to start")
    parser.add_argument("--silent", action="store_true", help="never answer (a hung helper)")
    args = parser.parse_args()
    held = 0

    def record(text: str) -> None:
        with open(args.state, "a") as handle:
            handle.write(f"{os.getpid()} {text}\n")

    def state() -> dict:
        return {
            "ok": True,
            "backend": "stand-in",
            "held": held,
            "free": args.total - held,
            "total": args.total,
        }

    def on_term(signum: int, frame: object) -> None:
        record("released")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if args.silent:
        record("silent")
        time.sleep(3600)
    if args.fail_start:
        print(json.dumps({"ok": False, "error": "stand-in refuses: no device"}), flush=True)
        return 1
    record("started")
    print(json.dumps({**state(), "ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "hold":
            held = max(0, args.total - int(request["headroom"]))
            record(f"hold {held} follow={bool(request.get('follow'))}")
        elif request["op"] == "release":
            held = 0
            record("release")
        print(json.dumps(state()), flush=True)
    record("released")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
