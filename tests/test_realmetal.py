"""Real Metal mode, tested here with a stand-in ``sysctl`` (and ``sudo``) on PATH.

There is no Apple GPU on this machine: the stand-ins record the commands they were
given and keep the "kernel" value in a file, so the set/restore path is real code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pytest_metaloom import realmetal

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


def test_command_construction():
    assert realmetal.set_command(24576) == ["sudo", "-n", "sysctl", "iogpu.wired_limit_mb=24576"]
    assert realmetal.set_command(0, sudo=False) == ["sysctl", "iogpu.wired_limit_mb=0"]
    with pytest.raises(ValueError, match=">= 0"):
        realmetal.set_command(-1)


def test_lowers_and_restores(fake_macos):
    fake_macos.write_text("40960\n")
    with realmetal.WiredLimit(8192):
        assert realmetal.read_wired_limit_mb() == 8192
    assert realmetal.read_wired_limit_mb() == 40960
    log = (fake_macos.parent / "wired.log").read_text().splitlines()
    assert log[0] == "-n iogpu.wired_limit_mb"  # the old value is read before anything changes
    writes = [line for line in log if "=" in line]
    assert writes == ["iogpu.wired_limit_mb=8192", "iogpu.wired_limit_mb=40960"]


def test_restores_when_the_process_is_interrupted(fake_macos):
    code = (
        "import time\nfrom pytest_metaloom import realmetal\n"
        "realmetal.WiredLimit(4096).apply()\nprint('lowered', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "lowered"
        assert fake_macos.read_text().strip() == "4096"
        proc.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt, then atexit
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert fake_macos.read_text().strip() == "0"


def test_missing_sysctl_and_failures_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(realmetal.RealMetalError, match="'sysctl' is not on PATH"):
        realmetal.read_wired_limit_mb()


def test_refuses_to_run_off_apple_silicon():
    reason = realmetal.metal_unavailable_reason()
    if sys.platform == "darwin" and os.uname().machine == "arm64":
        assert reason is None
    else:
        assert reason and "needs Apple Silicon" in reason


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the off-Apple-Silicon skip")
def test_matrix_in_real_metal_mode_is_skipped_with_the_reason(pytester):
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        "--metaloom-real-metal",
        "--metaloom-faults=cmdbuf_oom",
        "-rs",
    )
    assert result.ret == pytest.ExitCode.OK
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) > 0 and "passed" not in outcomes
    result.stdout.fnmatch_lines(["*real Metal mode needs Apple Silicon*"])
