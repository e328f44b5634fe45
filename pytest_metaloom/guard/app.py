"""``Guard``: the supervisor plus the listener, startable from Python or the command line."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_metaloom.guard.config import GuardConfig, GuardConfigError, option_names
from pytest_metaloom.guard.proxy import GuardServer
from pytest_metaloom.guard.supervisor import FAILED, SERVING, Supervisor


class Guard:
    """Own ``host:port``, run ``worker_cmd`` behind it, survive and report the worker's deaths.

    Use ``with Guard([...], port=0) as g:`` in tests; ``g.url`` is the address to talk to.
    """

    def __init__(
        self,
        worker_cmd: list[str],
        *,
        port: int = 0,
        env: dict[str, str] | None = None,
        log: Callable[[str], None] | None = None,
        **opts: Any,
    ) -> None:
        unknown = sorted(set(opts) - set(option_names()))
        if unknown:
            raise GuardConfigError(
                f"unknown guard option(s) {unknown}; valid: {', '.join(option_names())}"
            )
        if "log_dir" in opts and opts["log_dir"] is not None:
            opts["log_dir"] = Path(opts["log_dir"])
        self.config = GuardConfig(worker_cmd=list(worker_cmd), port=port, env=env, **opts)
        self.config.validate()
        self.supervisor = Supervisor(self.config, log=log)
        self._server: GuardServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("guard not started: call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> Guard:
        """Bind the port first (so a busy port fails fast), then start the worker."""
        try:
            self._server = GuardServer((self.config.host, self.config.port), self.supervisor)
        except OSError as exc:
            raise OSError(
                f"metaloom-guard cannot listen on {self.config.host}:{self.config.port}: {exc}; "
                "pick a free --port (0 lets the kernel choose)"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="metaloom-guard-listener",
            daemon=True,
        )
        self._thread.start()
        self.supervisor.log(f"listening on {self.url}")
        self.supervisor.start()
        return self

    def wait_serving(self, timeout: float | None = None) -> bool:
        """True once a worker is ready behind the guard; False if the guard gave up or time ran out.

        Without ``timeout`` the bound is the guard's own: the longest a restart may take
        (the backoff ceiling, the old worker's stop, the new one's ``ready_timeout``).
        """
        cfg = self.config
        if timeout is None:
            timeout = cfg.backoff_max + cfg.stop_timeout + cfg.ready_timeout + 5.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisor.state == FAILED:
                return False
            if self.supervisor.acquire(min(0.2, max(0.0, deadline - time.monotonic()))):
                return True
        return self.supervisor.state == SERVING

    def stop(self) -> None:
        """Stop listening, then end the worker tree (SIGTERM, bounded wait, SIGKILL)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.supervisor.stop()
        if self._thread is not None:
            self._thread.join(5.0)
        self._server = None

    def status(self) -> dict[str, Any]:
        return self.supervisor.status()

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_FLAG_BOOLS = {"warmup": "--no-warmup", "quiet": "--quiet"}


def guard_command(worker_cmd: list[str], port: int, **opts: Any) -> list[str]:
    """argv that runs the guard as a subprocess in this interpreter (for the pytest plugin)."""
    valid = set(option_names()) - {"port"}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise GuardConfigError(
            f"unknown guard option(s) {unknown}; valid: {', '.join(sorted(valid))}"
        )
    argv = [sys.executable, "-m", "pytest_metaloom.guard", "--port", str(port)]
    for name, value in opts.items():
        if name in _FLAG_BOOLS:
            default_on = name == "warmup"
            if bool(value) != default_on:
                argv.append(_FLAG_BOOLS[name])
            continue
        if value is None:
            continue
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return [*argv, "--", *worker_cmd]
