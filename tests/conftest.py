"""Shared fixtures for the project's own tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _mlx_outlives_in_process_runs(request: pytest.FixtureRequest) -> None:
    """Import MLX before a pytester test can run pytest in-process.

    Pytester drops, after an in-process run, every module first imported during it; MLX's
    nanobind extension cannot be imported a second time in one process (it aborts the
    whole worker: 'duplicate key "cpu"'). Imported here, MLX is in the snapshot and kept.
    """
    if "pytester" in request.fixturenames:
        import mlx.core  # noqa: F401


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    return build_tiny_model(ModelSpec())


STAND_IN_SYSCTL = """#!/bin/sh
# stand-in for macOS sysctl: state in $STATE, every call logged to $STATE.log
printf "%s\\n" "$*" >> "$STATE.log"
if [ "$1" = "-n" ]; then cat "$STATE"; exit 0; fi
case "$1" in iogpu.wired_limit_mb=*) echo "${1#*=}" > "$STATE"; exit 0;; esac
echo "unknown sysctl call" >&2; exit 1
"""
STAND_IN_SUDO = """#!/bin/sh
# stand-in for sudo: drops -n and runs the rest
[ "$1" = "-n" ] && shift
exec "$@"
"""


@pytest.fixture
def fake_macos(tmp_path, monkeypatch):
    """Stand-ins for macOS ``sysctl`` and ``sudo`` on PATH; returns the "kernel" value file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sysctl", STAND_IN_SYSCTL), ("sudo", STAND_IN_SUDO)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    state = tmp_path / "wired"
    state.write_text("0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STATE", str(state))
    return state
