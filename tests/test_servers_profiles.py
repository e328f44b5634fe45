"""Server profiles: the built-in ones, the file format, and the option that picks one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import STANDINS, fake_server_cmd

from pytest_metaloom.config import Settings
from pytest_metaloom.server.profiles import (
    ProfileError,
    builtin_names,
    load_profile,
    parse_profile,
)

pytest_plugins = ["pytester"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_built_in_server_has_a_valid_profile():
    assert builtin_names() == ["mlx-openai-server", "mlx_lm", "rapid-mlx", "vllm-mlx"]
    for name in builtin_names():
        profile = load_profile(name)
        assert profile.name == name
        if name == "mlx_lm":
            assert profile.command is None  # the mlx_lm.server of this interpreter
        else:
            assert any("{port}" in part for part in profile.command)
            assert profile.install


def test_the_default_profile_is_mlx_lm():
    settings = Settings.resolve(lambda name: None, lambda name: None)
    assert settings.profile.name == "mlx_lm"
    assert settings.server_command is None


def test_server_cmd_wins_over_the_profile_command():
    cli = {"metaloom_server": "rapid-mlx", "metaloom_server_cmd": "my-server --port {port}"}
    settings = Settings.resolve(cli.get, lambda name: None)
    assert settings.server_command == ["my-server", "--port", "{port}"]
    settings = Settings.resolve({"metaloom_server": "rapid-mlx"}.get, lambda name: None)
    assert settings.server_command[0] == "rapid-mlx"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = "x"\ncomand = ["a", "{port}"]', "unknown key 'comand'; did you mean 'command'?"),
        ('name = "x"\ncommand = ["srv", "--port", "8080"]', "no {port} placeholder"),
        ('name = "x"\ncommand = ["s", "{port}"]\npaths = ["batch"]', "'paths' must name some of"),
        ('name = "x"\ncommand = "s {port}"', "'command' must be a list"),
        ('name = "x"\ncommand = ["s", "{port}"]\ncached_tokens = "yes"', "must be true or false"),
        ('name = "x"\ncommand = ["s", "{port}"]\nhealth_path = "health"', "must start with '/'"),
        ('name = "x"', "'command' is required"),
        ("name = ", "not valid TOML"),
    ],
)
def test_a_bad_profile_names_the_key_and_the_fix(text, needle):
    with pytest.raises(ProfileError) as info:
        parse_profile(text, source="p.toml")
    assert needle in str(info.value)


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(ProfileError, match="did you mean 'rapid-mlx'"):
        load_profile("rapid_mlx")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("ci/nowhere.toml")


def test_unproven_evidence_says_why():
    own = parse_profile('name = "own"\ncommand = ["s", "{port}"]\nprompt_cache = "own"')
    assert "its own prompt cache" in own.unproven()["cache_reset"]
    witnessed = parse_profile('name = "w"\ncommand = ["s", "{port}"]\ncached_tokens = true')
    assert witnessed.unproven() == {}
    assert load_profile("mlx_lm").unproven() == {}


def test_activate_on_reaches_the_server_environment():
    p = parse_profile('name = "e"\ncommand = ["s", "{port}"]\nactivate_on = ["a.engine", "b"]')
    assert p.server_env() == {"METALOOM_ACTIVATE_ON": "a.engine,b"}


def test_the_worked_example_in_the_guide_is_a_valid_profile():
    page = (DOCS / "guides" / "servers.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", page, re.DOTALL)
    assert blocks, "the servers guide shows no profile"
    for block in blocks:
        profile = parse_profile(block, source="docs/guides/servers.md")
        assert profile.command


# ---------------------------------------------------------------------- through pytest


def test_a_profile_file_runs_the_matrix_and_a_runtime_error_is_told_once(
    pytester: pytest.Pytester, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A server with no MLX in it: one clear error, the other scenarios refer to it,
    and the JSON report is still written with every scenario marked not run."""
    monkeypatch.setenv("METALOOM_CACHE_DIR", str(model_dir.parent))
    command = json.dumps([*fake_server_cmd(), "--port", "{port}"])
    pytester.makefile(".toml", noml=f'name = "no-mlx"\ncommand = {command}\n')
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--metal-oom", "--metaloom-server", "noml.toml",
        "--metaloom-faults", "resource_limit", "--metaloom-report", str(report), timeout=120,
    )  # fmt: skip
    out = result.stdout.str()
    # The short summary repeats each failure's first line (whole when CI is set, cut to the
    # terminal's width otherwise), so "told once" is counted in the failure reports above it.
    failures = out.split("short test summary info")[0]
    assert failures.count("never loaded a model with mlx_lm.load") == 1, out
    assert "cause and the fix are given once" in failures
    records = json.loads(report.read_text())["scenarios"]
    assert records and {r["outcome"] for r in records} == {"not_run"}
    told = [r for r in records if "never loaded a model" in " ".join(r["reasons"])]
    assert len(told) == 1, records
    assert all(r["reasons"] for r in records)
    assert not list((STANDINS).glob("*.pid"))
