"""Real Metal mode: no simulation, the real limits lowered until MLX fails for real.

Only meaningful on Apple Silicon. Here the MLX limits are lowered inside the server
(through the injector's ``limits`` control, which arms no fault) and, when the user
explicitly allows it, the system ceiling ``iogpu.wired_limit_mb`` is lowered with
``sudo sysctl`` and restored afterwards, including on Ctrl-C and SIGTERM (both reach
the restore through pytest's teardown and ``atexit``).
"""

from __future__ import annotations

import atexit
import platform
import shutil
import subprocess
from collections.abc import Sequence

SYSCTL_KEY = "iogpu.wired_limit_mb"


class RealMetalError(RuntimeError):
    pass


def metal_unavailable_reason() -> str | None:
    """None on Apple Silicon; otherwise why real Metal mode cannot run here."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return (
            f"real Metal mode needs Apple Silicon; this is {platform.system()} "
            f"{platform.machine()} (run without --metaloom-real-metal for simulated faults)"
        )
    return None


def _run(argv: Sequence[str], timeout: float = 20.0) -> str:
    if shutil.which(argv[0]) is None:
        raise RealMetalError(f"{argv[0]!r} is not on PATH; it is needed to change {SYSCTL_KEY}")
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RealMetalError(
            f"{' '.join(argv)} failed with exit code {done.returncode}: "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout.strip()


def read_wired_limit_mb() -> int:
    """The current ceiling in MB (0 means the OS default)."""
    value = _run(["sysctl", "-n", SYSCTL_KEY])
    try:
        return int(value.split()[-1])
    except (ValueError, IndexError) as exc:
        raise RealMetalError(f"unexpected answer from sysctl -n {SYSCTL_KEY}: {value!r}") from exc


def set_command(limit_mb: int, *, sudo: bool = True) -> list[str]:
    """The exact command that sets the ceiling (what an operator would type)."""
    if limit_mb < 0:
        raise ValueError(f"{SYSCTL_KEY} must be >= 0 (0 restores the default), got {limit_mb}")
    argv = ["sysctl", f"{SYSCTL_KEY}={int(limit_mb)}"]
    return ["sudo", "-n", *argv] if sudo else argv


class WiredLimit:
    """Lower ``iogpu.wired_limit_mb`` for a while; always put the old value back."""

    def __init__(self, limit_mb: int, *, sudo: bool = True) -> None:
        self.limit_mb = limit_mb
        self.sudo = sudo
        self.previous: int | None = None

    def apply(self) -> WiredLimit:
        self.previous = read_wired_limit_mb()
        atexit.register(self.restore)
        _run(set_command(self.limit_mb, sudo=self.sudo))
        return self

    def restore(self) -> None:
        if self.previous is None:
            return
        previous, self.previous = self.previous, None
        _run(set_command(previous, sudo=self.sudo))
        atexit.unregister(self.restore)

    def __enter__(self) -> WiredLimit:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.restore()
