"""A metaloom-managed server: the process, its injector control and its event log.

``ServerProcess`` knows nothing of faults; this module composes it with the
environment that loads the in-server injector (and, when asked, a patch overlay or
the guard in front). Scripts, the fixtures and the matrix all use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_metaloom.server.process import (
    DEFAULT_READY_TIMEOUT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    ExternalServer,
    ServerProcess,
)


class LiveServer:
    """One server under test. ``injector`` is None when metaloom cannot control it."""

    def __init__(
        self,
        *,
        run_dir: str | Path,
        model: str | Path | None = None,
        command: Sequence[str] | None = None,
        server_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        faults: str | None = None,
        limits: str | None = None,
        overlay: str | Path | None = None,
        guard: bool = False,
        guard_options: Mapping[str, Any] | None = None,
        url: str | None = None,
        name: str = "mlx-server",
        start_timeout: float = DEFAULT_START_TIMEOUT,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        warmup: bool = True,
        request_fields: Mapping[str, Any] | None = None,
    ) -> None:
        from pytest_metaloom.inject.injector import Injector, bootstrap_env

        # fields every request body carries (a profile's request shape, e.g. the model name)
        self.request_fields = dict(request_fields or {})
        self.warmup = warmup

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = Path(model) if model is not None else None
        self.guard = guard
        self.guard_options = dict(guard_options or {})
        self.overlay = Path(overlay) if overlay is not None else None
        self.injector: Any = None
        if url is not None:
            self.process: ServerProcess | ExternalServer = ExternalServer(url)
            return
        inject_env = bootstrap_env(
            self.run_dir, faults=faults, limits=limits, base_env={**os.environ, **(env or {})}
        )
        full_env = {**(env or {}), **inject_env}
        if self.overlay is not None:
            full_env["PYTHONPATH"] = os.pathsep.join(
                [str(self.overlay), full_env.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep)
        self.injector = Injector(inject_env["METALOOM_CONTROL"], inject_env["METALOOM_EVENTS"])
        if guard:
            command, server_args = self._behind_guard(command, server_args)
        self.process = ServerProcess(
            model=self.model,
            command=command,
            server_args=server_args,
            env=full_env,
            log_dir=self.run_dir,
            name=name,
            start_timeout=start_timeout,
            ready_timeout=ready_timeout,
            stop_timeout=stop_timeout,
            # with request fields the warm-up must carry them: done in start() below
            warmup=warmup and not self.request_fields,
        )

    def _behind_guard(
        self, command: Sequence[str] | None, server_args: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        from pytest_metaloom.guard import guard_command

        if command is None:
            if self.model is None:
                raise ValueError("a model is needed to run mlx_lm.server behind the guard")
            worker = ["{python}", "-m", "mlx_lm", "server", "--model", str(self.model)]
        else:
            worker = list(command)
        worker = [part.replace("{python}", sys.executable) for part in worker]
        # the worker logs live in the run dir: a guard killed outright leaves no temp dir
        options = {"log_dir": str(Path(self.run_dir) / "guard-logs"), **self.guard_options}
        return guard_command([*worker, *server_args], port="{port}", **options), []

    # -- delegation ----------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def signal(self) -> str | None:
        return self.process.signal

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def log_text(self) -> str:
        return self.process.log_text()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def start(self) -> LiveServer:
        if self.injector is not None:
            from pytest_metaloom.inject.injector import ensure_socket_dir

            ensure_socket_dir(self.injector.control_path)
        self.process.start()
        if self.request_fields and isinstance(self.process, ServerProcess):
            self._warm_up_with_fields()
        return self

    def _warm_up_with_fields(self) -> None:
        from pytest_metaloom.judge import workload

        if not self.warmup:
            return

        def probe(timeout: float) -> None:
            obs = workload.chat(self, workload.single_turn("hello"), max_tokens=1, deadline=timeout)
            if obs.status != 200:
                raise OSError(f"warm-up completion answered {obs.status}: {obs.body[:300]!r}")

        try:
            self.process._wait_until("ready", self.process.ready_timeout, probe)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> int | None:
        """Stop the server; a short control-socket dir outside the run dir goes with it."""
        try:
            return self.process.stop()
        finally:
            if self.injector is not None:
                from pytest_metaloom.inject.injector import remove_socket_dir

                remove_socket_dir(self.injector.control_path)

    def restart(self) -> LiveServer:
        self.process.restart()
        return self

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault control ---------------------------------------------------------------
    def _require_injector(self) -> Any:
        if self.injector is None:
            raise RuntimeError(
                "this server is not managed by metaloom (--metaloom-url), so faults cannot be "
                "injected into it; start it through the fixtures to inject faults"
            )
        return self.injector

    def arm(self, spec: str) -> dict:
        """Arm (replacing whatever was armed) a fault spec in the running server."""
        return self._require_injector().arm(spec)

    def require_runtime(self, timeout: float = 15.0) -> None:
        """Raise ``RuntimeNotStarted`` (cause and fix) unless some process of the server
        runs the injector runtime; the matrix checks this once per server start."""
        injector = self._require_injector()
        injector.wait_started(timeout, alive=self.is_alive)

    def disarm(self) -> dict:
        return self._require_injector().disarm()

    def metal_limits(self, *, wired: str | int | None = None, memory: str | int | None = None):
        """Lower the memory and wired limits inside the running server."""
        return self._require_injector().set_limits(wired=wired, memory=memory)

    def events(self, since: int = 0) -> list[dict]:
        return self._require_injector().events(since)
