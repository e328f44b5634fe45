"""A handle on one live server process: start, wait until ready, watch, stop.

It knows nothing of pytest or of faults, so scripts and the guard can use it too.
Design points, each learned from process fixtures that leaked or lied:

- the child runs in its own session, output goes to a file (never an undrained pipe);
- start-up waits in two bounded phases: *live* (``/health`` answers at all) and
  *ready* (a one-token completion succeeds; ``mlx_lm.server`` loads the model lazily);
- if the child exits while we wait, we fail at once with its exit code and log tail;
- stop sends SIGTERM to the whole group and tree, waits a bounded time, then SIGKILL;
- every started tree is registered with the reaper, so it dies even if we are killed;
- ports come from ``server/ports.py`` (outside the ephemeral range, claimed across
  processes); a server that still loses its port to another process (EADDRINUSE at its
  bind) is started again on another one;
- plain HTTP (probes, warm-up) goes through ``server/http.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from pytest_metaloom.options import default
from pytest_metaloom.server import ports, reaper
from pytest_metaloom.server.http import request as http_request

__all__ = [
    "ExternalServer",
    "ServerCommandNotFound",
    "ServerError",
    "ServerNotReachable",
    "ServerProcess",
    "ServerStartError",
    "describe_exit",
    "http_request",
    "read_tail",
    "signal_name",
    "warmup_completion",
]

DEFAULT_START_TIMEOUT: float = default("metaloom_start_timeout")
DEFAULT_READY_TIMEOUT: float = default("metaloom_ready_timeout")
DEFAULT_STOP_TIMEOUT: float = default("metaloom_stop_timeout")
PORT_ATTEMPTS = 3
"""Starts tried on fresh ports when another process took the claimed port first."""
_POLL = 0.05


class ServerError(RuntimeError):
    """Base class for every server start/stop problem; the message says what to do."""


class ServerCommandNotFound(ServerError):
    pass


class ServerStartError(ServerError):
    """The server exited (or never became ready) during start-up."""

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        log_tail: str = "",
        port_in_use: bool = False,
    ):
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail
        self.port_in_use = port_in_use


class ServerNotReachable(ServerError):
    """Nothing answers at a URL we were told to use."""


def signal_name(returncode: int | None) -> str | None:
    """``-6`` -> ``"SIGABRT"``; None for normal exits and running processes."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    name = signal_name(returncode)
    return f"killed by {name} (returncode {returncode})" if name else f"exit code {returncode}"


def warmup_completion(base_url: str, *, timeout: float) -> None:
    """A one-token completion: proves the model is loaded and generation works."""
    status, body = http_request(
        base_url + "/v1/chat/completions",
        "POST",
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1},
        timeout=timeout,
    )
    if status != 200:
        raise OSError(f"warm-up completion answered {status}: {body[:300]!r}")


def read_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, read from its end (logs can be large)."""
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        data = handle.read().decode(errors="replace")
    return "\n".join(data.splitlines()[-lines:])


class ServerProcess:
    """A live ``mlx_lm.server`` (or any command speaking its HTTP API).

    ``command`` may contain ``{python}``, ``{host}``, ``{port}`` and ``{model}``
    placeholders; without ``{port}``, ``--host HOST --port PORT`` are appended.
    Without ``command`` the real ``mlx_lm.server`` of this interpreter is used.
    """

    def __init__(
        self,
        *,
        model: str | Path | None = None,
        command: Sequence[str] | None = None,
        server_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: str | Path,
        name: str = "mlx-server",
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        warmup: bool = True,
        cwd: str | Path | None = None,
    ) -> None:
        self.model = Path(model) if model is not None else None
        self.command = list(command) if command else None
        self.server_args = list(server_args)
        self.extra_env = dict(env or {})
        self.log_dir = Path(log_dir)
        self.name = name
        self.host = host
        self.requested_port = port
        self.start_timeout = start_timeout
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.warmup = warmup
        self.cwd = cwd
        self.port: int | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port_claimed = False

    # -- what a test can look at -------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError(f"{self.name} has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def signal(self) -> str | None:
        return signal_name(self.returncode)

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)

    def argv(self) -> list[str]:
        """The command line the next start will run (placeholders resolved)."""
        port = str(self.port if self.port is not None else self.requested_port or 0)
        values = {
            "python": sys.executable,
            "host": self.host,
            "port": port,
            "model": str(self.model or ""),
        }
        if self.command is None:
            if self.model is None:
                raise ServerError("no model given: pass model=PATH (or --metaloom-model PATH)")
            base = [sys.executable, "-m", "mlx_lm", "server", "--model", str(self.model)]
            return [*base, "--host", self.host, "--port", port, *self.server_args]
        argv = [part.format(**values) for part in self.command]
        if not any("{port}" in part for part in self.command):
            argv += ["--host", self.host, "--port", port]
        return [*argv, *self.server_args]

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> ServerProcess:
        if self.is_alive():
            return self
        self._check_inputs()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start_once()
            except ServerStartError as exc:
                # the port was free when claimed, but something outside the claims
                # (not a metaloom process) bound it first: take another, a bounded number
                # of times; an explicitly requested port is never swapped
                if not exc.port_in_use or self.requested_port is not None:
                    raise
                if attempt == PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> ServerProcess:
        if self.port is None:
            if self.requested_port is not None:
                self.port = ports.claim_port(self.requested_port, self.host)
            else:
                self.port = ports.claim_free_port(self.host)
            self._port_claimed = True
        argv = self.argv()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"# metaloom: {' '.join(argv)}\n".encode())
        self._log.flush()
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self._release()
            raise ServerCommandNotFound(
                f"could not run {argv[0]!r}: {exc.strerror or exc}; check the server command"
            ) from exc
        reaper.register(self._proc.pid)
        try:
            self._wait_live()
            if self.warmup:
                self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *, keep_port: bool = False) -> int | None:
        """Stop the whole tree (SIGTERM, bounded wait, SIGKILL). Returns the exit code."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                reaper.kill_tree(proc.pid, term_timeout=self.stop_timeout, popen=proc)
            else:  # the leader is gone; its group or children may not be
                reaper.kill_tree(proc.pid, term_timeout=self.stop_timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_timeout)
            reaper.unregister(proc.pid)
        self._release(keep_port=keep_port)
        return proc.returncode if proc is not None else None

    def restart(self) -> ServerProcess:
        """Stop and start again on the same port (clients keep their URL)."""
        self.stop(keep_port=True)
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------
    def _check_inputs(self) -> None:
        if self.command is None:
            if self.model is None:
                raise ServerError("no model given: pass model=PATH (or --metaloom-model PATH)")
            if not self.model.exists():
                raise ServerError(
                    f"model path {self.model} does not exist; pass a directory holding an MLX "
                    "model (config.json + weights), or omit --metaloom-model to use the tiny model"
                )
            if not (self.model / "config.json").is_file():
                raise ServerError(
                    f"model path {self.model} has no config.json; it must be an MLX model directory"
                )
        else:
            exe = self.command[0].format(python=sys.executable)
            if shutil.which(exe) is None and not Path(exe).is_file():
                raise ServerCommandNotFound(
                    f"server command {exe!r} was not found on PATH; "
                    "fix --metaloom-server-cmd or install the program"
                )

    def _release(self, *, keep_port: bool = False) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        if self._port_claimed and not keep_port and self.port is not None:
            ports.release_port(self.port)
            self._port_claimed = False
            self.port = None

    def _died_error(self, phase: str) -> ServerStartError:
        code = self.returncode
        tail = self.log_tail(30)
        hint = ""
        port_in_use = "Address already in use" in tail
        if port_in_use:
            hint = f" (port {self.port} is taken by another process; choose another port)"
        return ServerStartError(
            f"{self.name} exited during {phase}: {describe_exit(code)}{hint}\n"
            f"command: {' '.join(self.argv())}\n--- log tail ({self.log_path}) ---\n{tail}",
            returncode=code,
            log_tail=tail,
            port_in_use=port_in_use,
        )

    def _wait_until(self, phase: str, timeout: float, probe) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            if not self.is_alive():
                raise self._died_error(phase)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(
                    f"{self.name} did not become {phase} within {timeout:.0f}s "
                    f"(last: {last_error}); raise the timeout or check the log\n"
                    f"--- log tail ({self.log_path}) ---\n{self.log_tail(30)}",
                    log_tail=self.log_tail(30),
                )
            try:
                probe(max(0.2, min(remaining, 30.0)))
                return
            except OSError as exc:
                last_error = str(exc) or exc.__class__.__name__
            time.sleep(_POLL)

    def _wait_live(self) -> None:
        def probe(timeout: float) -> None:
            http_request(self.url + "/health", timeout=min(timeout, 2.0))

        self._wait_until("live", self.start_timeout, probe)

    def _wait_ready(self) -> None:
        self._wait_until(
            "ready", self.ready_timeout, lambda t: warmup_completion(self.url, timeout=t)
        )


class ExternalServer:
    """A server someone else runs (``--metaloom-url``): never started nor stopped here."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.pid: int | None = None
        self.returncode: int | None = None
        self.signal: str | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self) -> ExternalServer:
        try:
            http_request(self.url + "/health", timeout=self.timeout)
        except OSError as exc:
            raise ServerNotReachable(
                f"nothing answers at {self.url} ({exc}); start the server first or drop "
                "--metaloom-url to let metaloom start one"
            ) from exc
        self.starts += 1
        return self

    def stop(self) -> None:
        return None

    def restart(self) -> ExternalServer:
        raise ServerError(f"cannot restart {self.url}: it is not managed by metaloom")

    def is_alive(self) -> bool:
        try:
            http_request(self.url + "/health", timeout=2.0)
        except OSError:
            return False
        return True

    def log_text(self) -> str:
        return ""

    def log_tail(self, lines: int = 40) -> str:
        return ""
