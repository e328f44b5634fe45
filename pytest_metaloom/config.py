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

from pytest_metaloom.options import OPTIONS, default, resolve


@dataclass(frozen=True)
class Settings:
    metal_oom: bool = default("metal_oom")
    metaloom_model: str | None = default("metaloom_model")
    metaloom_url: str | None = default("metaloom_url")
    metaloom_server: str | None = default("metaloom_server")
    metaloom_server_cmd: str | None = default("metaloom_server_cmd")
    metaloom_server_args: str | None = default("metaloom_server_args")
    metaloom_start_timeout: float = default("metaloom_start_timeout")
    metaloom_ready_timeout: float = default("metaloom_ready_timeout")
    metaloom_stop_timeout: float = default("metaloom_stop_timeout")
    metaloom_log_lines: int = default("metaloom_log_lines")
    metaloom_faults: list[str] = field(default_factory=list)
    metaloom_semantics: list[str] = field(default_factory=list)
    metaloom_paths: list[str] = field(default_factory=list)
    metaloom_sites: list[str] = field(default_factory=list)
    metaloom_stream: list[str] = field(default_factory=list)
    metaloom_full_matrix: bool = default("metaloom_full_matrix")
    metaloom_seed: int = default("metaloom_seed")
    metaloom_deadline: float = default("metaloom_deadline")
    metaloom_stall_floor: float = default("metaloom_stall_floor")
    metaloom_stall_multiplier: float = default("metaloom_stall_multiplier")
    metaloom_allow_unproven: bool = default("metaloom_allow_unproven")
    metaloom_report: str | None = default("metaloom_report")
    metaloom_patch_set: list[str] = field(default_factory=list)
    metaloom_allow_version_mismatch: bool = default("metaloom_allow_version_mismatch")
    metaloom_guard: bool = default("metaloom_guard")
    metaloom_real_metal: bool = default("metaloom_real_metal")
    metaloom_real_device: bool = default("metaloom_real_device")
    metaloom_headroom: str = default("metaloom_headroom")
    metaloom_headroom_cmd: str | None = default("metaloom_headroom_cmd")
    metaloom_turn_words: int = default("metaloom_turn_words")
    metaloom_max_turns: int = default("metaloom_max_turns")
    metaloom_model_spec: str | None = default("metaloom_model_spec")
    metaloom_sysctl: bool = default("metaloom_sysctl")

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
    def headroom_command(self) -> list[str] | None:
        """--metaloom-headroom-cmd split into argv (None: the built-in helper)."""
        return shlex.split(self.metaloom_headroom_cmd) if self.metaloom_headroom_cmd else None

    @property
    def server_args(self) -> list[str]:
        return shlex.split(self.metaloom_server_args) if self.metaloom_server_args else []
