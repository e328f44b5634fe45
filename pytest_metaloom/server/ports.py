"""The one port allocator: loopback ports outside the ephemeral range, claimed across processes.

``bind(0)`` hands out ports from the ephemeral range, the same range the kernel uses for
the source ports of outgoing connections (every HTTP request the harness makes), so a
port probed free can be taken by a client socket before the server binds it. Ports here
are drawn at random from below (or above) that range, and each claim is an exclusive
lock file in a directory shared by every process on this machine (pytest-xdist workers,
concurrent sessions, the guard), so two claimants never get the same port; a claim whose
owner is gone is stale and may be taken over. A server that still loses the race (its
bind fails with EADDRINUSE) is restarted on another port by ``server/process.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

_CLAIM_DIR_ENV = "METALOOM_PORT_DIR"
_MAX_TRIES = 200
PREFERRED = (20000, 32767)
"""Where ports are drawn from when it does not overlap the ephemeral range (Linux's
default ephemeral range starts at 32768, macOS's at 49152)."""
LOWEST = 10000


class PortInUseError(RuntimeError):
    """An explicitly requested port is already bound by something else."""


def ephemeral_range() -> tuple[int, int]:
    """The OS's ephemeral port range (inclusive), read where the OS tells it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError):
            low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
            return int(low), int(high)
        return 32768, 60999
    return 49152, 65535  # macOS, the BSDs and Windows (IANA's dynamic range)


def port_range() -> tuple[int, int]:
    """The inclusive range ports are drawn from: PREFERRED, moved clear of the ephemeral range."""
    low, high = PREFERRED
    eph_low, eph_high = ephemeral_range()
    if high < eph_low or low > eph_high:
        return low, high
    if eph_low - 1 - LOWEST >= 1000:  # room below the ephemeral range
        return LOWEST, eph_low - 1
    if 65535 - eph_high >= 1000:  # room above it
        return eph_high + 1, 65535
    raise RuntimeError(
        f"the ephemeral port range {eph_low}-{eph_high} leaves no room for server ports; "
        "narrow net.ipv4.ip_local_port_range"
    )


def _claim_path() -> Path:
    return Path(os.environ.get(_CLAIM_DIR_ENV) or Path(tempfile.gettempdir()) / "metaloom-ports")


def claim_dir() -> Path:
    """The machine-wide directory of port claims (one file per claimed port)."""
    path = _claim_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing is bound to ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_UNWRITTEN_GRACE = 10.0
"""Seconds a claim file may stay empty (created, owner pid not yet written) before it is stale."""


def _is_stale(lock: Path) -> bool:
    """True when the claim's owner process is gone (or never wrote its pid, long ago)."""
    try:
        text = lock.read_text().strip()
        if text:
            return not _pid_alive(int(text))
        return time.time() - lock.stat().st_mtime > _UNWRITTEN_GRACE
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


def _sweep_stale(directory: Path) -> None:
    """Remove the claims of processes that died without releasing them (SIGKILL, os._exit)."""
    with contextlib.suppress(OSError):
        for lock in directory.glob("*.lock"):
            if _is_stale(lock):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()


def _try_claim(port: int) -> bool:
    for _ in range(3):
        lock = claim_dir() / f"{port}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:  # the directory was removed (emptied) meanwhile
            continue
        except FileExistsError:
            if not _is_stale(lock):
                return False
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def claim_free_port(host: str = "127.0.0.1", *, rng: random.Random | None = None) -> int:
    """A port, outside the ephemeral range, free now and claimed for this process until released."""
    low, high = port_range()
    rng = rng or random.Random()
    for _ in range(_MAX_TRIES):
        port = rng.randint(low, high)
        if _try_claim(port):
            if port_is_free(port, host):
                return port
            release_port(port)
    raise RuntimeError(
        f"could not claim a free port in {low}-{high} after {_MAX_TRIES} tries; "
        f"stale claims may be in {claim_dir()}"
    )


def claim_port(port: int, host: str = "127.0.0.1") -> int:
    """Claim an explicitly chosen port, failing clearly if it is taken."""
    if not port_is_free(port, host) or not _try_claim(port):
        raise PortInUseError(
            f"port {port} on {host} is already in use by another process; "
            "choose another port or omit it to let metaloom pick a free one"
        )
    return port


def release_port(port: int) -> None:
    """Give a claimed port back; harmless if it was never claimed by us.

    Stale claims of dead processes are swept, and the claim directory is removed once it
    is empty, so nothing stays behind in /tmp.
    """
    directory = _claim_path()
    lock = directory / f"{port}.lock"
    try:
        owner = int(lock.read_text().strip() or "0")
    except (OSError, ValueError):
        return
    if owner == os.getpid():
        with contextlib.suppress(OSError):
            lock.unlink()
        _sweep_stale(directory)
        with contextlib.suppress(OSError):  # another claimant holds a lock: not empty
            directory.rmdir()


def tidy() -> None:
    """Sweep the claims of dead processes and remove the claim directory if it is empty
    (run at the end of a session that started servers)."""
    directory = _claim_path()
    if directory.is_dir():
        _sweep_stale(directory)
        with contextlib.suppress(OSError):
            directory.rmdir()


__all__ = [
    "PortInUseError",
    "claim_dir",
    "claim_free_port",
    "claim_port",
    "ephemeral_range",
    "port_is_free",
    "port_range",
    "release_port",
    "tidy",
]
