"""A watchdog process that kills registered server trees when the harness dies.

Finalizers do not run when pytest is killed (SIGKILL, ``os._exit`` from a timeout
thread, a crashed interpreter). The reaper closes that gap without polling: it reads
``add PID`` / ``del PID`` lines from a pipe whose write end only the harness holds.
When the harness is gone, for whatever reason, the pipe reads EOF and the reaper
kills every process tree still registered.

Run as ``python -m pytest_metaloom.reaper``; use it through :func:`register`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import psutil

_lock = threading.Lock()
_reaper: subprocess.Popen[bytes] | None = None


def kill_tree(pid: int, *, term_timeout: float = 5.0, kill_timeout: float = 5.0) -> list[int]:
    """SIGTERM a process, its process group and all descendants; SIGKILL survivors.

    Returns the pids that were still alive after SIGKILL (normally none).
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=term_timeout)
    if alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(alive, timeout=kill_timeout)
    return [proc.pid for proc in alive]


def _ensure_started() -> subprocess.Popen[bytes] | None:
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return _reaper
    try:
        _reaper = subprocess.Popen(
            [sys.executable, "-m", "pytest_metaloom.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        _reaper = None
    return _reaper


def _send(line: str) -> None:
    with _lock:
        reaper = _ensure_started()
        if reaper is None or reaper.stdin is None:
            return
        try:
            reaper.stdin.write(line.encode() + b"\n")
            reaper.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass


def register(pid: int) -> None:
    """Have the reaper kill ``pid``'s tree if this process dies without unregistering."""
    _send(f"add {pid}")


def unregister(pid: int) -> None:
    """The tree was stopped cleanly; the reaper may forget it."""
    _send(f"del {pid}")


def _serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watched: dict[int, list[psutil.Process]] = {}
    for raw in sys.stdin.buffer:
        verb, _, arg = raw.decode(errors="replace").strip().partition(" ")
        if not arg.isdigit():
            continue
        pid = int(arg)
        if verb == "add":
            with contextlib.suppress(psutil.Error):
                watched[pid] = [psutil.Process(pid)]
        elif verb == "del":
            watched.pop(pid, None)
    for pid, procs in watched.items():
        root = procs[0]
        with contextlib.suppress(psutil.Error):
            if root.is_running():
                kill_tree(pid, term_timeout=3.0)


if __name__ == "__main__":
    _serve()
