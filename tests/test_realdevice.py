"""Real-device mode, tested here with a stand-in headroom helper and MLX's CPU backend.

There is no GPU on this machine: the real squeeze cannot happen, so the helper is a
stand-in that speaks the real protocol and records what it was told to hold, and the
"pretend CUDA" conftest makes the plugin believe a CUDA device is here. The drive, the
judge, the release paths and the --metal-oom wiring are the real code.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_metaloom.matrix import realdevice
from pytest_metaloom.server import headroom
from pytest_metaloom.server.live import LiveServer

FAKE_HELPER = Path(__file__).parent / "standins" / "fake_headroom.py"
GiB = 1 << 30


def fake_command(state: Path, *flags: str) -> list[str]:
    return [sys.executable, str(FAKE_HELPER), "--state", str(state), *flags]


def states(state: Path) -> list[str]:
    return (
        [line.split(" ", 1)[1] for line in state.read_text().splitlines()] if state.exists() else []
    )


def gone(pid: int | None) -> bool:
    import psutil

    try:
        return pid is None or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---------------------------------------------------------------------- the helper


def test_helper_holds_all_but_the_headroom_and_releases(tmp_path):
    state = tmp_path / "state"
    with headroom.HeadroomHelper(fake_command(state, "--total", str(80 * GiB))) as helper:
        assert helper.ready["ready"] and helper.ready["total"] == 80 * GiB
        held = helper.hold(3 * GiB)
        assert held["free"] == 3 * GiB and held["held"] == 77 * GiB
        assert helper.hold(0, follow=True)["free"] == 0
        assert helper.release()["held"] == 0
        pid = helper.pid
        assert helper in headroom._LIVE
    assert gone(pid) and helper not in headroom._LIVE
    assert states(state) == [
        "started",
        f"hold {77 * GiB} follow=False",
        f"hold {80 * GiB} follow=True",
        "release",
        "released",
    ]


def test_helper_lets_go_when_the_harness_is_killed(tmp_path):
    """Killed outright, the harness runs no cleanup: the helper exits on stdin EOF."""
    state = tmp_path / "state"
    code = (
        "import sys, time\nfrom pytest_metaloom.server.headroom import HeadroomHelper\n"
        f"h = HeadroomHelper({fake_command(state)!r}).start()\nh.hold(1 << 30)\n"
        "print(h.pid, flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        helper_pid = int(proc.stdout.readline())
        assert states(state)[-1].startswith("hold")
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_for(lambda: gone(helper_pid))
    assert states(state)[-1] == "released"


def test_helper_failures_name_the_cause(tmp_path):
    with pytest.raises(headroom.HeadroomError, match="refused start: stand-in refuses: no device"):
        headroom.HeadroomHelper(fake_command(tmp_path / "s", "--fail-start")).start()
    silent = headroom.HeadroomHelper(fake_command(tmp_path / "s2", "--silent"), timeout=2)
    with pytest.raises(headroom.HeadroomError, match="gave no answer to start within 2 s"):
        silent.start()
    assert gone(silent.pid) and silent not in headroom._LIVE
    with pytest.raises(headroom.HeadroomError, match="not running; start"):
        headroom.HeadroomHelper(fake_command(tmp_path / "s3")).hold(GiB)
    with pytest.raises(ValueError, match="unknown"):
        headroom.helper_command("opencl")


def test_the_real_helper_names_what_is_missing_off_gpu():
    """The real helper here: no CUDA device, so it must refuse with the reason, not hang."""
    helper = headroom.HeadroomHelper(timeout=120)
    with pytest.raises(headroom.HeadroomError, match="refused start|exited"):
        helper.start()
    assert gone(helper.pid)


def test_a_session_releases_its_own_squeeze_and_nothing_else(tmp_path, fake_macos):
    """``DeviceSession.release`` (a session's teardown) gives back the helper and the
    ceilings of that session; another session's stay held."""
    from pytest_metaloom.matrix import backends, realmetal

    fake_macos.write_text("36864\n")
    mine = backends.DeviceSession(fake_command(tmp_path / "mine"))
    other = backends.DeviceSession(fake_command(tmp_path / "other"))
    assert mine.helper() is mine.helper()  # one helper per session, made on first use
    try:
        mine.helper().start().hold(GiB)
        other.helper().start().hold(2 * GiB)
        # a drive interrupted mid-squeeze: the ceiling is lowered and never relaxed
        pressure = realmetal.MetalPressure(None, None, 4096, ceilings=mine.ceilings)
        assert pressure.squeeze() == {"sysctl_mb": 4096}
        assert fake_macos.read_text().strip() == "4096" and len(mine.ceilings) == 1
        mine.release()
        assert states(tmp_path / "mine")[-1] == "released"
        assert fake_macos.read_text().strip() == "36864" and not mine.ceilings
        assert (
            other.helper().is_alive()
            and states(tmp_path / "other")[-1] == f"hold {78 * GiB} follow=False"
        )
        mine.release()  # twice is harmless
    finally:
        other.release()
    assert states(tmp_path / "other")[-1] == "released"


def test_a_relaxed_ceiling_leaves_the_session_ledger(fake_macos):
    from pytest_metaloom.matrix import realmetal

    fake_macos.write_text("36864\n")
    ceilings: set = set()
    pressure = realmetal.MetalPressure(None, None, 2048, ceilings=ceilings)
    pressure.squeeze()
    assert len(ceilings) == 1
    pressure.relax()
    assert not ceilings and fake_macos.read_text().strip() == "36864"


def test_real_device_options_are_checked_with_their_names(tmp_path):
    from pytest_metaloom.config import Settings
    from pytest_metaloom.matrix import backends

    session = backends.DeviceSession()
    with pytest.raises(realdevice.RealDeviceError, match="--metaloom-max-turns=0 would drive"):
        backends.plan_for(Settings(metaloom_max_turns=0), None, session)
    with pytest.raises(realdevice.RealDeviceError, match="--metaloom-headroom='3 bananas'"):
        backends.plan_for(Settings(metaloom_headroom="3 bananas"), None, session)
    assert not session.has_helper  # nothing was started for a plan that was refused
    command = f"{sys.executable} {FAKE_HELPER} --state '{tmp_path / 'a b'}'"
    assert Settings(metaloom_headroom_cmd=command).headroom_command == [
        *fake_command(tmp_path / "a b")
    ]


# ---------------------------------------------------------------------- plan and log reading


def test_off_gpu_the_reason_is_given():
    if realdevice.device_backend() == "cpu":
        reason = realdevice.unavailable_reason()
        assert reason and "needs a GPU MLX can use" in reason and "cpu backend" in reason
    else:
        assert realdevice.unavailable_reason() is None


def test_plan_rejects_bad_input_with_the_fix():
    with pytest.raises(ValueError, match="path must be batched or sequential"):
        realdevice.RealDevicePlan(path="serial")
    with pytest.raises(ValueError, match="site must be prefill or decode"):
        realdevice.RealDevicePlan(site="cache")
    with pytest.raises(ValueError, match="turn_words must be >= 1"):
        realdevice.RealDevicePlan(turn_words=0)
    with pytest.raises(ValueError, match=r"must name its request as \{rid\}"):
        realdevice.RealDevicePlan(simulate="1*unable_to_allocate@site=prefill")
    assert realdevice.RealDevicePlan(path="sequential").seed == 0
    assert realdevice.RealDevicePlan().seed is None


# The shape of the real failure measured on an H200 (mlx-lm 0.32.2, MLX CUDA backend).
CUDA_TRACEBACK = """\
Exception in thread Thread-2 (_generate):
Traceback (most recent call last):
  File "/tmp/site/mlx_lm/server.py", line 1034, in _generate
    responses = batch_generator.next()
  File "/tmp/site/mlx_lm/generate.py", line 1480, in next
    return self._next()
  File "/tmp/site/mlx_lm/generate.py", line 1229, in prompt
    mx.eval([c.state for c in self.prompt_cache])
RuntimeError: cudaMallocAsync(&data, size, stream) failed: out of memory
"""


def test_the_real_failure_is_found_in_the_log_with_its_site():
    error, where, site = realdevice.failure_in_log("noise\n" + CUDA_TRACEBACK + "127.0.0.1 - 404\n")
    assert error == "RuntimeError: cudaMallocAsync(&data, size, stream) failed: out of memory"
    assert where == "generate.py:1229 in prompt: mx.eval([c.state for c in self.prompt_cache])"
    assert site == "cache"  # the injector's name for a prompt-cache state evaluation
    forward = CUDA_TRACEBACK.replace(
        "mx.eval([c.state for c in self.prompt_cache])", "mx.eval(self.y)"
    )
    assert realdevice.failure_in_log(forward)[2] == "prefill"
    decode = CUDA_TRACEBACK.replace("in prompt", "in _step").replace(
        "mx.eval([c.state for c in self.prompt_cache])", "mx.async_eval(self._next_tokens)"
    )
    assert realdevice.failure_in_log(decode)[2] == "decode"
    first_token = decode.replace("in next\n", "in __init__\n")
    assert realdevice.failure_in_log(first_token)[2] == "prefill"
    assert realdevice.failure_in_log("all fine\n") == (None, None, None)


# ---------------------------------------------------------------------- the drive, live


@pytest.fixture(scope="module")
def cpu_server(model_dir, tmp_path_factory):
    """A real mlx_lm.server on the CPU backend, where no real device failure can happen."""
    server = LiveServer(run_dir=tmp_path_factory.mktemp("dev"), model=model_dir, name="dev")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_squeezed_drive_without_a_real_failure_is_not_fired_and_released(cpu_server, tmp_path):
    state = tmp_path / "state"
    helper = headroom.HeadroomHelper(fake_command(state))
    plan = realdevice.RealDevicePlan(headroom=3 * GiB, turn_words=40, max_turns=2, deadline=60)
    try:
        result = realdevice.run_real_device(cpu_server, plan, realdevice.CudaPressure(helper, plan))
    finally:
        helper.stop()
    assert result.outcome.outcome == "not_fired"
    assert result.outcome.reasons == ["no real failure within 2 turns"]
    assert result.turns == [200, 200] and result.error_text is None
    # squeezed to the headroom for the drive, released before returning
    assert states(state)[:3] == ["started", f"hold {77 * GiB} follow=False", "release"]
    assert result.pressure["squeeze"]["free"] == 3 * GiB
    assert not [e for e in result.events if e["event"] in ("armed", "fired")]


@pytest.mark.timeout(240)
def test_simulated_counterpart_on_the_same_workload_is_judged_by_the_same_oracle(cpu_server):
    """The fidelity bench's simulated half: the injector fails turn 1 of the same loop.

    Stock mlx-lm 0.32.2 on the batched path loses the generation thread: wedged.
    """
    plan = realdevice.RealDevicePlan(
        turn_words=40,
        max_turns=4,
        deadline=60,
        simulate="1*unable_to_allocate@path=batched,site=prefill,request={rid}",
        simulate_turn=1,
    )
    result = realdevice.run_real_device(cpu_server, plan)
    assert result.turns[0] == 200 and len(result.turns) == 2
    assert result.kind == "unable_to_allocate"
    assert result.error_text and "Unable to allocate" in result.error_text
    fired = [e for e in result.events if e["event"] == "fired"]
    assert fired and result.site == fired[-1]["site"]  # where the injector says it fired
    assert result.outcome.outcome == "wedged"
    assert result.outcome.facts.health_after_fault == 503


def test_external_server_is_refused_with_the_reason():
    class External:
        injector = None

    with pytest.raises(realdevice.RealDeviceError, match="needs a server that metaloom started"):
        realdevice.run_real_device(External())


# ---------------------------------------------------------------------- the --metal-oom wiring

PRETEND_CUDA_CONFTEST = """
# Stand-in for a CUDA box: real-device mode believes a GPU is here. The stand-in
# headroom helper and the number of turns come in as options (see _pretend); the run
# itself is real (mlx_lm.server on the CPU backend).
from pytest_metaloom.matrix import realdevice

_saved = {}


def pytest_configure(config):
    _saved.update(backend=realdevice.device_backend)
    realdevice.device_backend = lambda: "cuda"


def pytest_unconfigure(config):
    realdevice.device_backend = _saved["backend"]
"""


def _pretend(pytester, state: Path, turns: int) -> list[str]:
    """Pretend CUDA is here; the options that name the stand-in helper and the turns."""
    pytester.makeconftest(PRETEND_CUDA_CONFTEST)
    return [
        f"--metaloom-headroom-cmd={shlex.join(fake_command(state))}",
        f"--metaloom-max-turns={turns}",
    ]


@pytest.mark.timeout(240)
def test_metal_oom_real_device_squeezes_judges_and_releases(pytester, tmp_path, model_dir):
    state = tmp_path / "state"
    pretend = _pretend(pytester, state, turns=2)
    report = pytester.path / "real.json"
    result = pytester.runpytest(
        *pretend,
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        "--metaloom-real-device",
        f"--metaloom-model={model_dir}",
        "--metaloom-headroom=2GiB",
        "--metaloom-turn-words=40",
        f"--metaloom-report={report}",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and "skipped" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines(
        ["*real-device-tool_loop?installed?: no real failure happened*", "*within 2 turns*"]
    )
    assert states(state) == ["started", f"hold {78 * GiB} follow=False", "release", "released"]
    (record,) = json.loads(report.read_text())["scenarios"]
    assert record["outcome"] == "not_fired" and record["turns"] == [200, 200]
    assert record["pressure"]["backend"] == "cuda"
    reproduce = shlex.split(record["reproduce"])  # the same turns and the same helper
    assert reproduce[reproduce.index("--metaloom-max-turns") + 1] == "2"
    helper = reproduce[reproduce.index("--metaloom-headroom-cmd") + 1]
    assert shlex.split(helper) == fake_command(state)


def test_real_device_mode_is_skipped_with_the_reason_off_gpu(pytester):
    if realdevice.device_backend() != "cpu":
        pytest.skip("this machine has a GPU: the skip cannot be shown here")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--metal-oom", "--metaloom-real-device", "-rs"
    )
    assert result.ret == pytest.ExitCode.OK
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) > 0 and "passed" not in outcomes
    result.stdout.fnmatch_lines(["*real-device mode needs a GPU MLX can use*"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_helper_is_released_when_the_session_is_interrupted(pytester, tmp_path, model_dir, signum):
    import psutil

    state = tmp_path / "state"
    pretend = _pretend(pytester, state, turns=100000)
    argv = [sys.executable, "-m", "pytest", *pretend, "-p", "no:cacheprovider", "--metal-oom"]
    argv += ["--metaloom-real-device", f"--metaloom-model={model_dir}", "--metaloom-turn-words=5"]
    proc = subprocess.Popen(
        argv,
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert wait_for(lambda: any(s.startswith("hold") for s in states(state)), 150), (
            "the helper never squeezed"
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(1.0)  # turns are in flight: interrupt mid-drive
        proc.send_signal(signum)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert states(state)[-1] == "released"
    assert children and not [p for p in children if p.is_running() and p.status() != "zombie"]


@pytest.mark.timeout(240)
def test_an_inner_session_releases_only_what_it_squeezed(pytester, tmp_path, model_dir, fake_macos):
    """An in-process pytester run is a session of its own: at its end it gives back its
    own helper, never the helper and the lowered ceiling its outer session still holds."""
    from pytest_metaloom.matrix import realmetal

    fake_macos.write_text("36864\n")
    outer_state = tmp_path / "outer"
    outer = headroom.HeadroomHelper(fake_command(outer_state))
    ceiling = realmetal.WiredLimit(4096)
    try:
        outer.start().hold(5 * GiB)
        ceiling.apply()
        inner_state = tmp_path / "inner"
        pretend = _pretend(pytester, inner_state, turns=2)
        result = pytester.runpytest(
            *pretend,
            "-p",
            "no:cacheprovider",
            "--metal-oom",
            "--metaloom-real-device",
            f"--metaloom-model={model_dir}",
            "--metaloom-turn-words=40",
        )
        assert result.parseoutcomes().get("failed") == 1, result.stdout.str()  # not fired
        # the inner session squeezed with its own helper and let it go
        assert states(inner_state) == [
            "started",
            f"hold {77 * GiB} follow=False",
            "release",
            "released",
        ]
        # the outer's helper still holds what it was told, and was never told to let go
        assert states(outer_state) == ["started", f"hold {75 * GiB} follow=False"]
        assert outer.is_alive() and outer.info()["held"] == 75 * GiB
        # the outer's lowered ceiling is still lowered, and still remembers the old value
        assert fake_macos.read_text().strip() == "4096" and ceiling.previous == 36864
    finally:
        outer.stop()
        ceiling.restore()
    assert states(outer_state)[-1] == "released"
    assert fake_macos.read_text().strip() == "36864"
