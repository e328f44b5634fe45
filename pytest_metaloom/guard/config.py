"""Guard settings, their defaults and validation, in one place for the CLI and the Python API."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


class GuardConfigError(ValueError):
    """A guard setting is wrong; the message names the setting and how to fix it."""


@dataclass
class GuardConfig:
    """Everything the guard needs; ``worker_cmd`` is the worker's argv (e.g. mlx_lm.server ...)."""

    worker_cmd: list[str]
    port: int = 8080
    host: str = "127.0.0.1"
    env: dict[str, str] | None = None
    log_dir: Path | None = None
    max_restarts: int = 5
    restart_window: float = 60.0
    backoff: float = 0.25
    backoff_max: float = 10.0
    queue_timeout: float = 0.0
    hang_timeout: float = 600.0
    probe_timeout: float = 5.0
    proof_window: float = 30.0
    ready_timeout: float = 180.0
    warmup: bool = True
    warmup_path: str = "/v1/completions"
    warmup_body: str = json.dumps({"prompt": "x", "max_tokens": 1, "temperature": 0.0})
    health_path: str = "/health"
    stop_timeout: float = 10.0
    quiet: bool = False

    def validate(self) -> None:
        """Reject settings that would make the guard misbehave later, naming the fix."""
        if not self.worker_cmd or not all(isinstance(a, str) for a in self.worker_cmd):
            raise GuardConfigError(
                "worker command is empty: pass it after '--', e.g. "
                "metaloom-guard --port 8080 -- mlx_lm.server --model DIR"
            )
        if not 0 <= self.port <= 65535:
            raise GuardConfigError(f"--port {self.port} is out of range: use 0..65535")
        positive = (
            "restart_window",
            "backoff_max",
            "ready_timeout",
            "stop_timeout",
            "probe_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise GuardConfigError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("backoff", "queue_timeout", "hang_timeout", "proof_window"):
            if getattr(self, name) < 0:
                raise GuardConfigError(
                    f"--{name.replace('_', '-')} must be >= 0 (0 disables or means none)"
                )
        if self.max_restarts < 0:
            raise GuardConfigError("--max-restarts must be >= 0 (0 means never restart)")
        for name in ("warmup_path", "health_path"):
            if not getattr(self, name).startswith("/"):
                raise GuardConfigError(f"--{name.replace('_', '-')} must start with '/'")
        try:
            json.loads(self.warmup_body)
        except ValueError as exc:
            raise GuardConfigError(f"--warmup-body is not valid JSON: {exc}") from None


def option_names() -> list[str]:
    """The keyword options ``guard_command`` and ``Guard`` accept besides the worker command."""
    skip = {"worker_cmd", "env"}
    return [f.name for f in fields(GuardConfig) if f.name not in skip]
