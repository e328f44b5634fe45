"""Harness side of the injector: server environment, control client, event reader.

The server half lives in ``inject/runtime/``; the two meet only through
environment variables, a Unix control socket and a JSON-lines event log, so a
test can inspect a server that has already died (the log survives an abort).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest_metaloom
from pytest_metaloom.inject import BOOTSTRAP_DIR
from pytest_metaloom.inject.faults import FaultSpecError, parse_spec

__all__ = ["REQUEST_HEADER", "Injector", "InjectorError", "RuntimeNotStarted", "bootstrap_env"]

REQUEST_HEADER = "X-Metaloom-Request-Id"
# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS; keep a margin.
_SOCKET_PATH_MAX = 100
PACKAGE_ROOT = Path(pytest_metaloom.__file__).resolve().parent.parent


class InjectorError(RuntimeError):
    """The in-server injector refused a request or could not be reached."""


class RuntimeNotStarted(InjectorError):
    """No process of the server switched the runtime on: no fault can fire in it."""


_SHORT_DIR_PREFIX = "mlm-"


@functools.cache
def _short_socket_base() -> Path:
    """One short ``/tmp/mlm-*`` dir per harness process for control sockets whose run-dir
    path is too long for a Unix socket. It belongs to the process, not to a server: it is
    removed when the process exits, or by the reaper should the process be killed, so no
    caller of :func:`bootstrap_env` can leave one behind."""
    base = Path(tempfile.mkdtemp(prefix=_SHORT_DIR_PREFIX, dir="/tmp"))
    atexit.register(shutil.rmtree, base, True)
    from pytest_metaloom.server import reaper

    reaper.register_dir(base)
    return base


def _socket_path(run_dir: Path) -> Path:
    """The control socket's path: in the run dir, or (when that path is too long for a Unix
    socket) named after the run dir in this process's short socket dir."""
    path = run_dir / "metaloom.sock"
    if len(os.fsencode(str(path))) <= _SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(str(run_dir.resolve()))).hexdigest()[:16]
    return _short_socket_base() / f"{digest}.sock"


def ensure_socket_dir(control_path: str | Path) -> None:
    """Make sure the socket's directory exists before the server binds it."""
    Path(control_path).parent.mkdir(parents=True, exist_ok=True)


def remove_socket_dir(control_path: str | Path) -> None:
    """Delete a stopped server's socket when it lives in the short dir (run dirs are left
    alone); the short dir itself goes when the harness process exits."""
    control = Path(control_path)
    if control.parent.parent == Path("/tmp") and control.parent.name.startswith(_SHORT_DIR_PREFIX):
        control.unlink(missing_ok=True)


def bootstrap_env(
    run_dir: Path,
    *,
    faults: str | None = None,
    limits: str | None = None,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Env vars to add to a server's environment so the injector loads inside it.

    ``faults`` is validated here, so a typo fails before a server is started.
    """
    if faults is not None:
        parse_spec(faults)
    if limits is not None:
        _check_limits(limits)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = os.environ if base_env is None else base_env
    parts = [str(BOOTSTRAP_DIR), str(PACKAGE_ROOT)]
    if base.get("PYTHONPATH"):
        parts.append(base["PYTHONPATH"])
    env = {
        "PYTHONPATH": os.pathsep.join(parts),
        "METALOOM_EVENTS": str(run_dir / "events.jsonl"),
        "METALOOM_CONTROL": str(_socket_path(run_dir)),
    }
    if faults is not None:
        env["METALOOM_FAULTS"] = faults
    if limits is not None:
        env["METALOOM_LIMITS"] = limits
    return env


def _check_limits(text: str) -> None:
    """``wired=SIZE,memory=SIZE`` in the one grammar (``units.parse_limits``)."""
    from pytest_metaloom import units

    try:
        units.parse_limits(text)
    except units.SizeError as exc:
        raise FaultSpecError(exc.problem, exc.text, exc.pos, exc.length) from None


class Injector:
    """Client for one server's injector (control socket + event log)."""

    def __init__(self, control_path: str | Path, events_path: str | Path) -> None:
        self.control_path = str(control_path)
        self.events_path = Path(events_path)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Injector:
        """Build a client from the dict :func:`bootstrap_env` returned."""
        return cls(env["METALOOM_CONTROL"], env["METALOOM_EVENTS"])

    # ------------------------------------------------------------------ control

    def _call(self, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        data = (json.dumps(request) + "\n").encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.control_path)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise RuntimeNotStarted(f"cannot reach the injector: {self.diagnose()}") from exc
        except (OSError, TimeoutError) as exc:
            raise InjectorError(
                f"cannot reach the injector at {self.control_path} ({exc}); is the server "
                "running, and was it started with the env from bootstrap_env()?"
            ) from exc
        try:
            answer = json.loads(reply.decode())
        except json.JSONDecodeError as exc:
            raise InjectorError(f"injector sent a broken reply {reply[:200]!r}") from exc
        if not answer.get("ok"):
            raise InjectorError(f"injector refused {request.get('op')!r}: {answer.get('error')}")
        return answer

    def arm(self, spec: str, timeout: float = 5.0) -> dict[str, Any]:
        """Replace all armed points with ``spec`` (validated here first)."""
        parse_spec(spec)
        return self._call({"op": "arm", "spec": spec}, timeout)

    def disarm(self, timeout: float = 5.0) -> dict[str, Any]:
        """Disarm everything, release hangs; the reply has per-point hits/fired."""
        return self._call({"op": "disarm"}, timeout)

    def set_limits(
        self, wired: int | str | None = None, memory: int | str | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Apply real MLX wired/memory limits (SIZE strings are resolved in the server)."""
        return self._call({"op": "limits", "wired": wired, "memory": memory}, timeout)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._call({"op": "status"}, timeout)

    def snapshot(self, timeout: float = 5.0) -> dict[str, Any]:
        """Memory counters and prompt-cache state, read inside the server."""
        return self._call({"op": "snapshot"}, timeout)

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            return bool(self._call({"op": "ping"}, timeout).get("ok"))
        except InjectorError:
            return False

    # ------------------------------------------------------------------ start-up

    def listening(self) -> bool:
        """True once some process of the server serves the control socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(self.control_path)
            return True
        except OSError:
            return False

    def wait_started(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Bounded wait for the runtime; :class:`RuntimeNotStarted` names cause and fix."""
        deadline = time.monotonic() + timeout
        while not self.listening():
            # no bootstrap event: no process of the ready server runs Python with our path
            nothing = not any(e.get("event") == "bootstrap" for e in self.events())
            if nothing or not alive() or time.monotonic() >= deadline:
                raise RuntimeNotStarted(self.diagnose(waited=timeout))
            time.sleep(0.05)

    def diagnose(self, waited: float | None = None) -> str:
        """Why no runtime answers, read from the event log, with the fix for that cause."""
        events = self.events()
        boots = [e for e in events if e.get("event") == "bootstrap"]
        active = [e for e in events if e.get("event") == "activated"]
        declined = [e for e in events if e.get("event") == "activation_declined"]
        errors = [e for e in events if e.get("event") == "error"]
        within = f" within {waited:g}s of the server being ready" if waited else ""
        head = f"the metaloom runtime is not running in this server{within} (control socket "
        head += f"{self.control_path} is not served), so no fault can be injected: "
        if not boots:
            return head + (
                "no Python process of the server loaded the metaloom bootstrap. Cause: the "
                "server command is not a Python program, or it drops PYTHONPATH (python -I / "
                "-E / -S, a wrapper script that resets the environment). Fix: run the server "
                "with a Python that keeps PYTHONPATH, e.g. '{python} -m your_server ...' or the "
                "console script of a venv, and let wrappers pass the environment through."
            )
        procs = "; ".join(
            f"pid {e.get('pid')}: {' '.join(map(str, e.get('argv') or [])) or e.get('executable')}"
            for e in boots[-4:]
        )
        if active:
            last = active[-1]
            return head + (
                f"it started in pid {last.get('pid')} ({last.get('reason')}) and that process "
                "is gone. Cause: the model process exited or was restarted. Fix: read the "
                "server log for why it ended."
            )
        if declined:
            return head + (
                f"pid {declined[-1].get('pid')} declined because pid {declined[-1].get('owner')} "
                "holds the control lock and no longer serves it. Fix: a forked model process "
                "cannot take over; start model processes with multiprocessing 'spawn'."
            )
        detail = f" Last error: {errors[-1].get('error')}." if errors else ""
        return head + (
            f"its Python processes ({procs}) never imported mlx_lm.server, never loaded a "
            "model with mlx_lm.load/load_model and never called mlx-lm's generation code "
            f"(generate_step, stream_generate, BatchGenerator).{detail} Fix: if the server "
            "loads or runs the model another way, name the module that does it in the server "
            "profile's activate_on (METALOOM_ACTIVATE_ON); if it loads the model on the first "
            "request, keep the warm-up request on."
        )

    # ------------------------------------------------------------------ events

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Events from index ``since`` on; a partial last line (a writer mid-line) is skipped."""
        try:
            raw = self.events_path.read_bytes()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                out.append(json.loads(line))
        return out[since:]

    def fired(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "fired"]

    def wait_for(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """First event named ``event`` (matching ``predicate``); bounded polling."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events(since):
                if e.get("event") == event and (predicate is None or predicate(e)):
                    return e
            if time.monotonic() >= deadline:
                tail = "\n".join(json.dumps(e) for e in self.events()[-8:])
                raise TimeoutError(
                    f"no {event!r} event within {timeout:g}s in {self.events_path}; "
                    f"last events:\n{tail or '(none)'}"
                )
            time.sleep(0.05)
