"""A watchdog process that kills registered server trees when the harness dies.

Finalizers do not run when pytest is killed (SIGKILL, ``os._exit`` from a timeout
thread, a crashed interpreter). The reaper closes that gap without polling: it reads
``add PID`` / ``del PID`` lines from a pipe whose write end only the harness holds.
When the harness is gone, for whatever reason, the pipe reads EOF and the reaper
kills every process tree still registered.

Run as ``python -m pytest_metaloom.server.reaper``; use it through :func:`register`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil

_lock = threading.Lock()
_reaper: subprocess.Popen[bytes] | None = None


def kill_tree(
    pid: int,
    *,
    term_timeout: float = 5.0,
    kill_timeout: float = 5.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> list[int]:
    """SIGTERM a process, its process group and all descendants; SIGKILL survivors.

    Pass the ``Popen`` of a direct child so that its exit status is collected by
    ``Popen`` itself (psutil would reap it and the return code would be lost).
    Returns the pids that were still alive after SIGKILL (normally none).
    """
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        root, descendants = None, []
    watched = descendants if popen is not None else [p for p in [root, *descendants] if p]

    def signal_all(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        targets = [*watched, *([root] if popen is not None and root else [])]
        for proc in targets:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def wait_all(timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=timeout)
        _, alive = psutil.wait_procs(watched, timeout=max(0.0, deadline - time.monotonic()))
        if popen is not None and popen.poll() is None and root is not None:
            alive.append(root)
        return alive

    signal_all(signal.SIGTERM)
    alive = wait_all(term_timeout)
    if alive:
        signal_all(signal.SIGKILL)
        alive = wait_all(kill_timeout)
    return [proc.pid for proc in alive]


def _ensure_started() -> subprocess.Popen[bytes] | None:
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return _reaper
    try:
        _reaper = subprocess.Popen(
            [sys.executable, "-m", "pytest_metaloom.server.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        _reaper = None
    else:
        # Closing our end at exit is what tells the reaper we are gone (it would see
        # EOF anyway); doing it explicitly avoids an "unclosed file" warning.
        atexit.register(_close_pipe, _reaper)
    return _reaper


def _close_pipe(reaper: subprocess.Popen[bytes]) -> None:
    if reaper.stdin is not None:
        with contextlib.suppress(OSError):
            reaper.stdin.close()


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


def register_dir(path: str | os.PathLike[str]) -> None:
    """Have the reaper remove directory ``path`` if this process dies without unregistering
    it (a server's short control-socket dir outside any run directory)."""
    _send(f"adddir {os.fspath(path)}")


def unregister_dir(path: str | os.PathLike[str]) -> None:
    """The directory was removed cleanly; the reaper may forget it."""
    _send(f"deldir {os.fspath(path)}")


def _serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watched: dict[int, list[psutil.Process]] = {}
    dirs: set[str] = set()
    for raw in sys.stdin.buffer:
        verb, _, arg = raw.decode(errors="replace").strip().partition(" ")
        if verb == "adddir" and arg:
            dirs.add(arg)
            continue
        if verb == "deldir":
            dirs.discard(arg)
            continue
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
    for path in dirs:  # after the trees: nothing uses them any more
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _serve()
