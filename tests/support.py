"""Helpers shared by the project's tests (importable as ``support``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

STANDINS = Path(__file__).parent / "standins"
FAKE_SERVER = STANDINS / "fake_server.py"


def fake_server_cmd(*flags: str) -> list[str]:
    """Command line of the stand-in server (not mlx_lm.server) with behaviour flags."""
    return [sys.executable, str(FAKE_SERVER), *flags]


def alive(pids: list[int]) -> list[int]:
    """The pids of ``pids`` still running (zombies count as gone)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


# A bound on waiting for something the code under test makes happen (a death, a log line, a
# removed directory). It is generous on purpose: it keeps a broken run from hanging, and it
# is never a claim about speed, so a loaded machine does not fail a correct run.
EVENT_WAIT = 60.0


def wait_until(condition: Callable[[], object], timeout: float = EVENT_WAIT) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passed; its last value as a bool."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= end:
            return bool(condition())
        time.sleep(0.05)
    return True


# mlx-lm lines that only wait: every array they evaluate was already evaluated, or
# committed by the ``mx.async_eval`` just before, so MLX allocates nothing there.
# ``tests/test_sites.py`` reads them in the installed mlx-lm.
WAIT_ONLY_LINES: dict[str, dict[str, str]] = {
    "0.32.2": {
        "generate.py:474": "mx.eval(y)",
        "generate.py:478": "y.item()",
        "generate.py:1439": "mx.eval(inputs, self._current_logprobs)",
        "generate.py:1440": "inputs.tolist()",
    },
    "0.31.3": {
        "generate.py:462": "mx.eval(y)",
        "generate.py:466": "y.item()",
        "generate.py:1374": "mx.eval(inputs, self._current_logprobs)",
        "generate.py:1375": "inputs.tolist()",
    },
}
