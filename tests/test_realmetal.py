"""Real Metal mode, tested here with a stand-in ``sysctl`` (and ``sudo``) on PATH (conftest).

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

from pytest_metaloom.matrix import realmetal
from pytest_metaloom.server.live import LiveServer


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
        "import time\nfrom pytest_metaloom.matrix import realmetal\n"
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


# ---------------------------------------------------------------------- the real run, live


@pytest.fixture(scope="module")
def cpu_server(model_dir, tmp_path_factory):
    """A real mlx_lm.server on the CPU backend, where no real Metal failure can happen."""
    server = LiveServer(run_dir=tmp_path_factory.mktemp("real"), model=model_dir, name="real")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_plan_rejects_bad_input_with_the_fix():
    with pytest.raises(ValueError, match=r"RealMetalPlan.wired='2XB' is not a size.*active\+2GiB"):
        realmetal.RealMetalPlan(wired="2XB")
    with pytest.raises(ValueError, match="sysctl_mb=0 would not lower anything"):
        realmetal.RealMetalPlan(sysctl_mb=0)
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        realmetal.RealMetalPlan(max_turns=0)


def test_sysctl_limit_is_the_weights_plus_headroom(model_dir):
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert weights > 0
    expected = -(-(weights + 2 * 2**30) // 2**20)  # ceil to MB
    assert realmetal.sysctl_limit_mb(model_dir) == expected
    assert realmetal.sysctl_limit_mb(None, headroom=2**20) == 1


@pytest.mark.timeout(180)
def test_cpu_backend_never_fails_for_real_so_it_is_not_fired(cpu_server, fake_macos):
    fake_macos.write_text("36864\n")
    plan = realmetal.RealMetalPlan(
        wired="active+1MiB", memory="active+1MiB", sysctl_mb=2048, max_turns=3, deadline=30
    )
    result = realmetal.run_real_scenario(cpu_server, plan)
    assert result.outcome.outcome == "not_fired"
    assert result.outcome.reasons == ["no real failure within 3 turns"]
    assert result.turns == [200, 200, 200]
    assert result.kind is None and cpu_server.is_alive()
    # the limits were really applied inside the server (accepted, not enforced, on CPU)
    assert result.limits["wired"]["accepted"] and result.limits["memory"]["accepted"]
    limit_events = [e for e in cpu_server.events() if e["event"] == "limits"]
    assert limit_events[-1]["wired"]["value"] == result.limits["wired"]["value"]
    # nothing was simulated: no fault armed, none fired
    assert not [e for e in result.events if e["event"] in ("armed", "fired")]
    # the system ceiling was lowered for the drive and then put back
    log = (fake_macos.parent / "wired.log").read_text().splitlines()
    assert [line for line in log if "=" in line] == [
        "iogpu.wired_limit_mb=2048",
        "iogpu.wired_limit_mb=36864",
    ]
    assert fake_macos.read_text().strip() == "36864"
    assert not realmetal._APPLIED


@pytest.mark.timeout(180)
def test_a_failure_during_the_drive_is_classified_by_the_oracle(cpu_server):
    """Stand-in for the real Metal error: the injector raises its exact text once usage grows.

    This checks the failure branch (log classification, facts, oracle); on a Mac the
    same branch would see MLX's own error. Stock mlx-lm 0.32.2 wedges on the batched path.
    """
    cpu_server.arm("1*cmdbuf_oom(deferred)@wired=active+1MiB,path=batched")
    plan = realmetal.RealMetalPlan(wired=None, memory=None, max_turns=8, deadline=30)
    result = realmetal.run_real_scenario(cpu_server, plan)
    assert result.kind == "cmdbuf_oom" and result.semantics == "deferred"
    assert result.turns[-1] is None  # the failing turn got no status line
    assert len(result.turns) < 8
    assert result.outcome.outcome == "wedged"
    assert result.outcome.facts.health_after_fault == 503
    assert any("generation thread died" in r or "404" in r for r in result.outcome.reasons)


def test_external_server_is_refused_with_the_reason():
    class External:
        injector = None

    with pytest.raises(realmetal.RealMetalError, match="needs a server that metaloom started"):
        realmetal.run_real_scenario(External())


# ---------------------------------------------------------------------- the --metal-oom wiring

PRETEND_MAC_CONFTEST = """
# Stand-in for a Mac: real Metal mode believes Metal is here. The run itself is real
# (mlx_lm.server on the CPU backend, the stand-in sysctl on PATH); the number of turns
# comes in as --metaloom-max-turns.
from pytest_metaloom.matrix import realmetal

_saved = {}


def pytest_configure(config):
    _saved.update(reason=realmetal.metal_unavailable_reason)
    realmetal.metal_unavailable_reason = lambda: None


def pytest_unconfigure(config):
    realmetal.metal_unavailable_reason = _saved["reason"]
"""


def _writes(state):
    log = (state.parent / "wired.log").read_text().splitlines()
    return [line for line in log if "=" in line]


@pytest.mark.timeout(240)
def test_metal_oom_runs_one_real_item_per_patch_set_and_restores_sysctl(
    pytester, fake_macos, model_dir
):
    fake_macos.write_text("36864\n")
    pytester.makeconftest(PRETEND_MAC_CONFTEST)
    report = pytester.path / "real.json"
    # the model is the outer session's: an in-process run that imported mlx itself would
    # have it dropped with its sys.modules snapshot, and mlx cannot be imported twice
    result = pytester.runpytest(
        f"--metaloom-model={model_dir}",
        "--metaloom-max-turns=2",
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        "--metaloom-real-metal",
        "--metaloom-sysctl",
        f"--metaloom-report={report}",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and "skipped" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*real-metal-tool_loop?installed?: no real failure happened*",
            "*- no real failure within 2 turns*",
            "*turns (status per turn): ?200, 200?*",
        ]
    )
    lowered = realmetal.sysctl_limit_mb(model_dir)
    assert _writes(fake_macos) == [f"iogpu.wired_limit_mb={lowered}", "iogpu.wired_limit_mb=36864"]
    assert fake_macos.read_text().strip() == "36864"
    import json

    (record,) = json.loads(report.read_text())["scenarios"]
    assert record["outcome"] == "not_fired" and record["verdict"] == "not fired"
    assert record["sysctl_mb"] == lowered and record["turns"] == [200, 200]
    assert record["limits"]["wired"]["accepted"] is True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_sysctl_is_restored_when_the_session_is_interrupted(pytester, fake_macos, signum):
    import psutil

    fake_macos.write_text("36864\n")
    pytester.makeconftest(PRETEND_MAC_CONFTEST)
    argv = [sys.executable, "-m", "pytest", "--metaloom-max-turns=100000"]
    argv += ["-p", "no:cacheprovider", "--metal-oom"]
    argv += ["--metaloom-real-metal", "--metaloom-sysctl"]
    proc = subprocess.Popen(
        argv, cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 150
        while fake_macos.read_text().strip() == "36864" and time.monotonic() < deadline:
            assert proc.poll() is None, "pytest ended before lowering the ceiling"
            time.sleep(0.1)
        assert fake_macos.read_text().strip() != "36864", "the ceiling was never lowered"
        servers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if any("mlx_lm" in part for part in p.cmdline())
        ]
        time.sleep(1.0)  # a few turns are in flight: interrupt mid-drive
        proc.send_signal(signum)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert fake_macos.read_text().strip() == "36864"
    assert _writes(fake_macos)[-1] == "iogpu.wired_limit_mb=36864"
    assert servers and not [p for p in servers if p.is_running() and p.status() != "zombie"]
