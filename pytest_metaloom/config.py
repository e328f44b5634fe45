"""Resolved settings: one object the fixtures and the matrix read, built once per session.

It does not import pytest: the plugin hands it two lookup functions (command line and
ini), so scripts can build the same object from plain dictionaries.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_metaloom.options import OPTIONS, resolve


@dataclass(frozen=True)
class Settings:
    metal_oom: bool = False
    metaloom_model: str | None = None
    metaloom_url: str | None = None
    metaloom_server: str | None = None
    metaloom_server_cmd: str | None = None
    metaloom_server_args: str | None = None
    metaloom_start_timeout: float = 60.0
    metaloom_ready_timeout: float = 120.0
    metaloom_stop_timeout: float = 10.0
    metaloom_log_lines: int = 40
    metaloom_faults: list[str] = field(default_factory=list)
    metaloom_semantics: list[str] = field(default_factory=list)
    metaloom_paths: list[str] = field(default_factory=list)
    metaloom_sites: list[str] = field(default_factory=list)
    metaloom_stream: list[str] = field(default_factory=list)
    metaloom_full_matrix: bool = False
    metaloom_seed: int = 0
    metaloom_deadline: float = 20.0
    metaloom_report: str | None = None
    metaloom_patch_set: list[str] = field(default_factory=list)
    metaloom_allow_version_mismatch: bool = False
    metaloom_guard: bool = False
    metaloom_real_metal: bool = False
    metaloom_sysctl: bool = False

    @classmethod
    def resolve(
        cls, cli: Callable[[str], Any], ini: Callable[[str], Any], **explicit: Any
    ) -> Settings:
        values = {
            option.dest: resolve(
                option.dest, cli(option.dest), ini(option.ini), explicit=explicit.get(option.dest)
            )
            for option in OPTIONS
        }
        return cls(**values)

    # Friendly accessors for the rest of the code base.
    @property
    def model_path(self) -> Path | None:
        return Path(self.metaloom_model).expanduser() if self.metaloom_model else None

    @property
    def profile(self) -> Any:
        """The server profile (``--metaloom-server``); raises ``ProfileError`` with the fix."""
        from pytest_metaloom.server.profiles import load_profile

        return load_profile(self.metaloom_server)

    @property
    def server_command(self) -> list[str] | None:
        """--metaloom-server-cmd, else the profile's command (None: mlx_lm.server)."""
        if self.metaloom_server_cmd:
            return shlex.split(self.metaloom_server_cmd)
        command = self.profile.command
        return list(command) if command else None

    @property
    def server_args(self) -> list[str]:
        return shlex.split(self.metaloom_server_args) if self.metaloom_server_args else []
