"""One worker process: spawn it so it can never outlive the guard, wait for it, kill its tree.

Kept behind this small class so the guard can move to the shared ``process.ServerProcess`` later
without touching the supervisor. The worker runs in its own session (so a signal to the guard's
terminal group does not hit it and we can signal its whole group), its output goes to files (never
an undrained pipe), and on Linux the kernel SIGKILLs it if the spawning thread dies
(``PR_SET_PDEATHSIG``). macOS has no such call; there a tiny watcher process polls the guard pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1

# Run by a separate interpreter on platforms without PR_SET_PDEATHSIG: exits when the worker is
# gone, kills the worker's process group when the guard is gone.
_WATCHER_SRC = """
import os, signal, sys, time
guard, worker = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while alive(worker):
    if not alive(guard) or os.getppid() != guard:
        try:
            os.killpg(worker, signal.SIGKILL)
        except OSError:
            pass
        break
    time.sleep(0.2)
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A worker port from the one allocator (``server/ports.py``): outside the ephemeral
    range and claimed across processes until ``ports.release_port`` (or this process ends)."""
    from pytest_metaloom.server import ports

    return ports.claim_free_port(host)


def _die_with_parent(parent_pid: int) -> None:
    """preexec hook: ask the kernel to SIGKILL us when the spawning thread goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the guard died between fork and prctl
        os._exit(1)


def worker_argv(command: list[str], port: int, host: str = "127.0.0.1") -> list[str]:
    """Point the worker at the private port: fill ``{port}``/``{host}`` or replace --host/--port."""
    if any("{port}" in a for a in command):
        return [a.replace("{port}", str(port)).replace("{host}", host) for a in command]
    out: list[str] = []
    skip_next = False
    for arg in command:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--host", "--port"):
            skip_next = True
            continue
        if arg.startswith(("--host=", "--port=")):
            continue
        out.append(arg)
    return [*out, "--host", host, "--port", str(port)]


class WorkerProcess:
    """A started worker: ``wait()`` blocks until it exits, ``kill()`` ends it and its children."""

    def __init__(
        self,
        argv: list[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        index: int = 0,
        use_watcher: bool | None = None,
    ) -> None:
        self.argv = argv
        self.stdout_path = log_dir / f"worker-{index}.stdout.log"
        self.stderr_path = log_dir / f"worker-{index}.stderr.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        linux = sys.platform.startswith("linux")
        parent = os.getpid()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    start_new_session=True,
                    preexec_fn=(lambda: _die_with_parent(parent)) if linux else None,
                )
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"worker command not found: {argv[0]!r}; give a full path or put it on PATH"
                ) from None
        self.pid = self._proc.pid
        self.started_at = time.monotonic()
        self._known_children: set[int] = set()
        self._watcher: subprocess.Popen[bytes] | None = None
        if use_watcher if use_watcher is not None else not linux:
            self._watcher = subprocess.Popen(
                [sys.executable, "-c", _WATCHER_SRC, str(parent), str(self.pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        return self._proc.poll()

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def exited(self) -> bool:
        """True once the process has ended, even before its reaper collected the status.

        Safe from any thread: it only looks (a zombie counts as ended), never reaps.
        """
        if self._proc.returncode is not None:
            return True
        try:
            return psutil.Process(self.pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit (raises subprocess.TimeoutExpired past the bound) and reap the watcher."""
        rc = self._proc.wait(timeout)
        if self._watcher is not None:
            try:
                self._watcher.wait(1.0)
            except subprocess.TimeoutExpired:
                self._watcher.kill()
                self._watcher.wait(1.0)
        return rc

    def _remember_children(self) -> None:
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        self._known_children.update(k.pid for k in kids)

    def _signal_all(self, sig: int) -> None:
        self._remember_children()
        try:
            os.killpg(self.pid, sig)
        except OSError:
            pass
        # Children that left our session (setsid) are still ours to end.
        for pid in list(self._known_children):
            try:
                os.kill(pid, sig)
            except OSError:
                self._known_children.discard(pid)

    def kill(self) -> None:
        """SIGKILL the worker and everything it started, right now (watchdog, hard stop)."""
        self._signal_all(signal.SIGKILL)

    def terminate_tree(self, timeout: float) -> int | None:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.is_alive():
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.kill()
        try:
            return self.wait(5.0)
        except subprocess.TimeoutExpired:
            return None

    def stderr_size(self) -> int:
        """Bytes written to stderr so far (a mark for ``stderr_since``)."""
        try:
            return os.stat(self.stderr_path).st_size
        except OSError:
            return 0

    def stderr_since(self, mark: int, max_bytes: int = 65536) -> str:
        """What the worker wrote to stderr after ``mark``: its last ``max_bytes`` at most."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(mark, size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, max_bytes: int = 16384) -> str:
        """The last ``max_bytes`` of the worker's stderr, where aborts print their reason."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""
