"""``metaloom-guard`` command line: parse options, run the guard until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from pytest_metaloom.guard.app import Guard
from pytest_metaloom.guard.config import GuardConfig, GuardConfigError

USAGE = "metaloom-guard [--host H] --port N [options] -- WORKER COMMAND..."


def build_parser() -> argparse.ArgumentParser:
    d = GuardConfig(worker_cmd=["x"])
    p = argparse.ArgumentParser(
        prog="metaloom-guard",
        usage=USAGE,
        description="Supervising front for mlx_lm.server: owns the port, answers 503 for a "
        "worker that died (even of SIGABRT) and restarts it.",
    )
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--max-restarts", type=int, default=d.max_restarts, help="cap per window")
    p.add_argument("--restart-window", type=float, default=d.restart_window, help="seconds")
    p.add_argument(
        "--backoff", type=float, default=d.backoff, help="second restart delay, doubling"
    )
    p.add_argument("--backoff-max", type=float, default=d.backoff_max, help="delay ceiling, s")
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=d.queue_timeout,
        help="seconds a request waits for a restarting worker (0: answer 503 at once)",
    )
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=d.hang_timeout,
        help="seconds without a byte before the watchdog probes /health (0: off)",
    )
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=d.probe_timeout,
        help="bound on each check of a worker suspected wedged (/health, one-token completion)",
    )
    p.add_argument(
        "--proof-window",
        type=float,
        default=d.proof_window,
        help="seconds a finished completion proves the worker serving to the guard's /health; "
        "past it (or after a failed or hung request) /health sends a one-token completion "
        "first (0: a proof stands until the next failure)",
    )
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout, help="seconds")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip warm-up request")
    p.add_argument("--warmup-path", default=d.warmup_path)
    p.add_argument("--warmup-body", default=d.warmup_body, help="JSON body of the warm-up POST")
    p.add_argument("--health-path", default=d.health_path, help="worker readiness path")
    p.add_argument("--stop-timeout", type=float, default=d.stop_timeout, help="SIGTERM->SIGKILL")
    p.add_argument("--log-dir", type=Path, default=None, help="worker stdout/stderr files")
    p.add_argument("--quiet", action="store_true", help="no lifecycle log lines")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Guard options before ``--``, the worker command after it."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    own, worker = split_argv(args_in)
    parser = build_parser()
    ns = parser.parse_args(own)
    if not worker:
        parser.error("no worker command: add it after '--', e.g. -- mlx_lm.server --model DIR")
    opts = vars(ns)
    port = opts.pop("port")
    try:
        guard = Guard(worker, port=port, **opts)
        guard.start()
    except (GuardConfigError, OSError) as exc:
        print(f"metaloom-guard: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        guard.supervisor.log(f"received {signal.Signals(signum).name}; stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        guard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
