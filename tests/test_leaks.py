"""No server outlives the pytest session, however the session ends.

Each case runs pytest in a subprocess whose test starts servers through the metaloom
fixtures and writes their pids (the whole tree) to a file; afterwards we scan for
survivors. Real mlx_lm.server where the case allows; the stand-in server for a server
that ignores SIGTERM or owns children in other sessions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import FAKE_SERVER, alive, wait_until

pytestmark = pytest.mark.timeout(180)

INNER = """
import os, sys, time
import psutil
import pytest

PID_FILE = {pid_file!r}
COMMAND = {command!r}

def record(server):
    procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    with open(PID_FILE, "a") as handle:
        handle.write("".join(f"{{p.pid}}\\n" for p in procs))
        handle.flush()
    with open(PID_FILE + ".control", "w") as handle:
        handle.write(server.injector.control_path if server.injector else "")

@pytest.fixture
def server(mlx_server_factory):
    return mlx_server_factory(command=COMMAND) if COMMAND else mlx_server_factory()

# func_only: the timeout runs from the test body on, however long the server took to start
@pytest.mark.timeout(4, method="thread", func_only=True)
def test_case(server):
    record(server)
    with open(PID_FILE + ".ready", "w") as handle:
        handle.write("ok")
    action = {action!r}
    if action == "fail":
        assert False, "failing on purpose"
    if action in ("sleep", "timeout"):
        time.sleep(60)
"""


def _write_case(pytester, action: str, command: list[str] | None = None) -> Path:
    pid_file = pytester.path / "pids"
    source = INNER.format(pid_file=str(pid_file), command=command, action=action)
    if action != "timeout":
        source = source.replace('@pytest.mark.timeout(4, method="thread", func_only=True)\n', "")
    pytester.makepyfile(test_case=source)
    return pid_file


def _pytest_argv(pytester, model_dir, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--metaloom-model={model_dir}",
        "--metaloom-stop-timeout=2",
        f"--basetemp={pytester.path / 'tmp'}",
        *extra,
    ]


def _start_until_ready(pytester, model_dir, pid_file: Path, **popen: object) -> subprocess.Popen:
    """Start the inner pytest and wait (bounded) until its test has a server running."""
    proc = subprocess.Popen(_pytest_argv(pytester, model_dir), cwd=pytester.path, **popen)
    ready = Path(str(pid_file) + ".ready")
    end = time.monotonic() + 90
    while not ready.exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.1)
    if not ready.exists():
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the inner test never started its server (exit {proc.returncode})")
    return proc


def _survivors(pid_file: Path, within: float = 15.0) -> list[int]:
    pids = [int(p) for p in pid_file.read_text().split()]
    assert pids, "the inner test never recorded a server"
    end = time.monotonic() + within
    while alive(pids) and time.monotonic() < end:
        time.sleep(0.2)
    return alive(pids)


@pytest.mark.parametrize("action", ["pass", "fail"])
def test_no_leak_when_tests_pass_or_fail(pytester, model_dir, action):
    pid_file = _write_case(pytester, action)
    done = subprocess.run(
        _pytest_argv(pytester, model_dir), cwd=pytester.path, capture_output=True, timeout=120
    )
    assert done.returncode == (0 if action == "pass" else 1), done.stdout.decode()[-2000:]
    assert _survivors(pid_file, within=1.0) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_no_leak_when_interrupted(pytester, model_dir, sig):
    pid_file = _write_case(pytester, "sleep")
    proc = _start_until_ready(
        pytester, model_dir, pid_file, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out.decode()[-2000:]
    assert _survivors(pid_file, within=2.0) == []


def test_no_leak_when_pytest_timeout_kills_the_session(pytester, model_dir):
    """pytest-timeout's thread method calls os._exit: no finalizer runs; the reaper acts."""
    pid_file = _write_case(pytester, "timeout")
    done = subprocess.run(
        _pytest_argv(pytester, model_dir), cwd=pytester.path, capture_output=True, timeout=120
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert "Timeout" in output, output[-3000:]
    assert pid_file.exists(), f"the inner test never started its server:\n{output[-3000:]}"
    assert _survivors(pid_file) == []


def test_no_leak_when_pytest_is_sigkilled(pytester, model_dir):
    pid_file = _write_case(pytester, "sleep")
    proc = _start_until_ready(
        pytester, model_dir, pid_file, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _survivors(pid_file) == []
    # a control socket outside the run dir (its path was too long) is removed by the reaper
    control = Path(Path(str(pid_file) + ".control").read_text())
    assert control.parent.name.startswith("mlm-"), "the case no longer needs a short socket dir"
    assert wait_until(lambda: not control.parent.exists()), f"{control.parent} was left behind"


@pytest.mark.parametrize(
    "flags", [["--ignore-sigterm"], ["--spawn-child"]], ids=["ignores-sigterm", "has-children"]
)
def test_no_leak_with_stubborn_or_parent_servers(pytester, model_dir, flags):
    pid_file = _write_case(pytester, "pass", command=[sys.executable, str(FAKE_SERVER), *flags])
    done = subprocess.run(
        _pytest_argv(pytester, model_dir), cwd=pytester.path, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    pids = [int(p) for p in pid_file.read_text().split()]
    if flags == ["--spawn-child"]:
        assert len(pids) == 2
    assert _survivors(pid_file, within=1.0) == []


SOCKET_CASE = """
import os

def test_case(mlx_server_factory):
    server = mlx_server_factory()
    control = server.injector.control_path
    assert os.path.exists(control), "the server never bound its control socket"
    with open({out!r}, "w") as handle:
        handle.write(control)
"""


def test_no_socket_dir_is_left_in_tmp_when_the_run_dir_path_is_long(pytester, model_dir):
    """A run dir too deep for a Unix socket path puts the socket in /tmp/mlm-*: gone at the end."""
    out = pytester.path / "control-path"
    pytester.makepyfile(test_case=SOCKET_CASE.format(out=str(out)))
    deep = pytester.path / ("d" * 60) / ("e" * 40)
    deep.parent.mkdir()
    done = subprocess.run(
        [
            *_pytest_argv(pytester, model_dir)[:-1],
            f"--basetemp={deep}",
        ],
        cwd=pytester.path,
        capture_output=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    control = Path(out.read_text())
    assert control.parent.parent == Path("/tmp") and control.parent.name.startswith("mlm-")
    assert not control.parent.exists(), f"{control.parent} was left behind"
