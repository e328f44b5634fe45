"""Any MLX server, not only mlx_lm.server: activation, the error when it cannot start,
and faults and verdicts in a server that never imports mlx_lm.server.

The server here is a stand-in (tests/standins/generation_server.py) because the real
downstream servers need multi-GB installs; it serves with mlx-lm's own generation code
(``stream_generate`` / ``BatchGenerator``), which is what the runtime hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import STANDINS, fake_server_cmd

from pytest_metaloom.inject import BOOTSTRAP_DIR
from pytest_metaloom.inject.injector import PACKAGE_ROOT, RuntimeNotStarted
from pytest_metaloom.judge import workload
from pytest_metaloom.matrix.runner import ScenarioRunner
from pytest_metaloom.matrix.scenarios import build_matrix
from pytest_metaloom.server.live import LiveServer

GENERATION_SERVER = STANDINS / "generation_server.py"


def standin_cmd(*flags: str) -> list[str]:
    return [
        "{python}", str(GENERATION_SERVER), "--model", "{model}",
        "--host", "{host}", "--port", "{port}", *flags,
    ]  # fmt: skip


def _events(server: LiveServer, name: str) -> list[dict]:
    return [e for e in server.events() if e.get("event") == name]


def _fire_one(server: LiveServer, path: str) -> tuple[workload.Observation, dict]:
    rid = "resource_limit-5e1f0c2a9b"
    server.arm(f"1*resource_limit@request={rid},site=decode,path={path}")
    obs = workload.chat(
        server.url,
        workload.single_turn(f"Explain why GPUs run out of memory ({rid})."),
        request_id=rid,
        max_tokens=8,
    )
    status = server.disarm()
    return obs, status


# ---------------------------------------------------------------------- activation


@pytest.mark.parametrize(
    ("flags", "path"),
    [((), "sequential"), (("--batched",), "batched"), (("--model-process",), "sequential")],
    ids=["stream_generate", "BatchGenerator", "spawned-model-process"],
)
def test_fault_fires_in_a_server_without_mlx_lm_server(model_dir, tmp_path, flags, path):
    with LiveServer(run_dir=tmp_path, model=model_dir, command=standin_cmd(*flags)) as server:
        obs, status = _fire_one(server, path)
        after = workload.chat(server.url, workload.single_turn("after"), max_tokens=2)
    assert status["fired"] == 1, server.events()
    assert obs.status == 503 and "Resource limit" in obs.body.decode()
    assert after.status == 200
    fired = _events(server, "fired")[0]
    assert (fired["site"], fired["path"]) == ("decode", path)
    assert fired["request_ids"] == ["resource_limit-5e1f0c2a9b"]
    activated = _events(server, "activated")
    assert len(activated) == 1 and activated[0]["reason"].startswith("mlx_lm.utils.load")
    assert fired["pid"] == activated[0]["pid"]
    boots = {e["pid"] for e in _events(server, "bootstrap")}
    if "--model-process" in flags:
        # the front process imported mlx-lm but never loaded a model: it stayed inert
        assert server.pid in boots and activated[0]["pid"] != server.pid
    else:
        assert activated[0]["pid"] == server.pid
    assert "mlx_lm.server" not in server.log_text()


def test_a_shell_wrapper_and_the_guard_stay_inert(model_dir, tmp_path):
    script = tmp_path / "serve.sh"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    script.chmod(0o755)
    command = [str(script), *standin_cmd()[1:]]
    server = LiveServer(run_dir=tmp_path / "run", model=model_dir, command=command, guard=True)
    with server:
        obs, status = _fire_one(server, "sequential")
        activated = _events(server, "activated")  # read before the stop tears the tree down
    assert status["fired"] == 1 and obs.status == 503
    assert len(activated) == 1
    # the guard (the process the harness started) loaded the bootstrap, did nothing else
    assert server.pid in {e["pid"] for e in _events(server, "bootstrap")}
    assert activated[0]["pid"] != server.pid
    assert {e["pid"] for e in _events(server, "fired")} == {activated[0]["pid"]}


def test_activate_on_names_a_server_engine_module(tmp_path):
    """A server that never touches mlx-lm's loaders switches on at its engine's import."""
    (tmp_path / "my_engine.py").write_text("import mlx.core as mx\nmx.eval(mx.array([1]))\n")
    env = _bootstrap_env(tmp_path, METALOOM_ACTIVATE_ON="my_engine")
    code = (
        "import my_engine\nfrom pytest_metaloom.inject import activation\n"
        "print(type(activation.runtime()).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, timeout=120
    )
    assert out.stdout.decode().strip() == "Runtime", out.stderr.decode()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "activated"] == ["import my_engine"]


def test_nothing_changes_without_the_harness(model_dir, tmp_path):
    """The bootstrap on PYTHONPATH but no METALOOM_* variable: mlx stays untouched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALOOM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(BOOTSTRAP_DIR), str(PACKAGE_ROOT)])
    code = (
        f"from mlx_lm import load; load({str(model_dir)!r})\n"
        "import mlx.core as mx, sys\n"
        "from pytest_metaloom.inject import activation\n"
        "print(activation.runtime(), type(mx.eval).__name__ == 'function',\n"
        "      'pytest_metaloom.inject.runtime' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, timeout=120
    )
    assert out.stdout.decode().split() == ["None", "False", "False"], out.stderr.decode()
    assert not list(tmp_path.iterdir())


def _bootstrap_env(run_dir: Path, **extra: str) -> dict[str, str]:
    from pytest_metaloom.inject.injector import bootstrap_env

    env = {**os.environ, **bootstrap_env(run_dir), **extra}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(run_dir)])
    return env


# ---------------------------------------------------------------------- cannot start


def test_a_server_without_mlx_names_the_cause_and_the_fix(tmp_path):
    server = LiveServer(run_dir=tmp_path, command=fake_server_cmd(), warmup=False)
    with server:
        with pytest.raises(RuntimeNotStarted) as info:
            server.require_runtime(timeout=1.0)
        text = str(info.value)
        assert "never loaded a model with mlx_lm.load" in text
        assert "activate_on" in text and str(server.pid) in text
        with pytest.raises(RuntimeNotStarted):  # arm says the same, not a socket error
            server.arm("1*resource_limit")


def test_a_command_that_drops_pythonpath_names_it(tmp_path):
    command = [sys.executable, "-I", *fake_server_cmd()[1:]]
    server = LiveServer(run_dir=tmp_path, command=command, warmup=False)
    with server:
        with pytest.raises(RuntimeNotStarted) as info:
            server.require_runtime(timeout=1.0)
    assert "drops PYTHONPATH" in str(info.value)


# ---------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("handling", ["graceful", "none"])
def test_matrix_verdicts_in_a_downstream_server(model_dir, tmp_path, handling):
    """resource_limit on both paths: graceful with the server's OOM handling, and a
    failing verdict without it -- the harness tells the two apart."""
    # sequential: stream_generate with LRUPromptCache, so cached_tokens witnesses the reset
    flags = () if handling == "graceful" else ("--no-oom-handling",)
    path = "sequential"
    scenarios = [
        s for s in build_matrix(faults=["resource_limit"], paths=[path]) if s.workload == "single"
    ][:1]
    server = LiveServer(run_dir=tmp_path, model=model_dir, command=standin_cmd(*flags))
    with server:
        runner = ScenarioRunner(server, deadline=30.0)
        try:
            result = runner.run(scenarios[0])
        finally:
            runner.close()
    outcome = result.outcome
    assert outcome.facts.fired, result.events
    if handling == "graceful":
        assert outcome.outcome == "graceful", outcome.reasons
    else:
        assert outcome.outcome == "wrong_status", outcome.reasons
        assert outcome.facts.status == 500
