"""Free TCP ports that no other pytest-xdist worker (or concurrent session) will take.

Binding port 0 gives a free port, but two workers can be handed the same one between
the probe and the server's own bind. Each claim is therefore also recorded as an
exclusive lock file in a directory shared by every worker on this machine; a claim
whose owner process is gone is stale and may be taken over.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

_CLAIM_DIR_ENV = "METALOOM_PORT_DIR"
_MAX_TRIES = 200


class PortInUseError(RuntimeError):
    """An explicitly requested port is already bound by something else."""


def claim_dir() -> Path:
    """The machine-wide directory of port claims (one file per claimed port)."""
    path = Path(os.environ.get(_CLAIM_DIR_ENV) or Path(tempfile.gettempdir()) / "metaloom-ports")
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


def _try_claim(port: int) -> bool:
    lock = claim_dir() / f"{port}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                return False
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def claim_free_port(host: str = "127.0.0.1") -> int:
    """Return a port that is free now and claimed for this process until released."""
    for _ in range(_MAX_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if _try_claim(port):
            if port_is_free(port, host):
                return port
            release_port(port)
    raise RuntimeError(f"could not claim a free port after {_MAX_TRIES} tries")


def claim_port(port: int, host: str = "127.0.0.1") -> int:
    """Claim an explicitly chosen port, failing clearly if it is taken."""
    if not port_is_free(port, host) or not _try_claim(port):
        raise PortInUseError(
            f"port {port} on {host} is already in use by another process; "
            "choose another port or omit it to let metaloom pick a free one"
        )
    return port


def release_port(port: int) -> None:
    """Give a claimed port back; harmless if it was never claimed by us."""
    lock = claim_dir() / f"{port}.lock"
    try:
        owner = int(lock.read_text().strip() or "0")
    except (OSError, ValueError):
        return
    if owner == os.getpid():
        with contextlib.suppress(OSError):
            lock.unlink()


__all__ = [
    "PortInUseError",
    "claim_dir",
    "claim_free_port",
    "claim_port",
    "port_is_free",
    "release_port",
]
