"""Helpers shared by the project's tests (importable as ``support``)."""

from __future__ import annotations

import sys
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
