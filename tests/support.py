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
