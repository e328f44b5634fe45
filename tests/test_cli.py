"""The ``metaloom`` CLI run as a real subprocess: exit codes, JSON, one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

LOGS = Path(__file__).parent / "data" / "logs"
TIMEOUT = 60


def metaloom(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_metaloom.tools.cli", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


def test_classify_found_is_exit_1_with_json() -> None:
    done = metaloom("classify", str(LOGS / "seed_abort_split.log"), "--json")
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    assert data["kind"] == "cmdbuf_oom"
    assert (data["semantics"], data["outcome"], data["exit_code"]) == ("abort", "aborted", -6)
    assert set(data) >= {"decisive_line", "line_number", "is_oom", "advice", "signal"}


def test_classify_clean_is_exit_0() -> None:
    done = metaloom("classify", str(LOGS / "clean.log"))
    assert done.returncode == 0, done.stderr
    assert "no failure found" in done.stdout


def test_classify_reads_stdin() -> None:
    text = (LOGS / "oom_killer.log").read_bytes()
    done = metaloom("classify", "-", "--json", stdin=text)
    assert done.returncode == 1
    assert json.loads(done.stdout)["kind"] == "killed"


def test_classify_unreadable_is_exit_2_one_line() -> None:
    for path in (LOGS / "binary.log", LOGS / "does-not-exist.log", LOGS):
        done = metaloom("classify", str(path))
        assert done.returncode == 2, path
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert done.stderr.startswith("metaloom classify: error:")


def test_usage_error_is_exit_2() -> None:
    assert metaloom("classify").returncode == 2
    assert metaloom("no-such-command").returncode == 2


def test_budget_seed_numbers_cross() -> None:
    done = metaloom(
        "budget",
        "--weights-bytes",
        "16GB",
        "--kv-bytes-per-token",
        str(2 * 48 * 4 * 128 * 2),
        "--prompt-cache-bytes",
        "15.55GB",
        "--ram",
        "48GiB",
        "--context",
        "80000",
        "--platform",
        "linux",
        "--json",
    )
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    assert data["fits"] is False and data["headroom_bytes"] < 0
    assert data["weights_bytes"] + data["prompt_cache_bytes"] < data["ceiling_bytes"]
    fixed = metaloom(
        "budget",
        "--weights-bytes",
        "16GB",
        "--kv-bytes-per-token",
        str(2 * 48 * 4 * 128 * 2),
        "--prompt-cache-bytes",
        str(data["suggested_prompt_cache_bytes"]),
        "--ram",
        "48GiB",
        "--context",
        "80000",
        "--platform",
        "linux",
    )
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "fits" in fixed.stdout


def test_budget_darwin_with_stand_in_sysctl(tmp_path: Path) -> None:
    """``sysctl`` here is a stand-in script (Linux has no iogpu sysctl)."""
    script = tmp_path / "sysctl"
    script.write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        "  iogpu.wired_limit_mb) echo 0 ;;\n"
        f"  hw.memsize) echo {48 * 2**30} ;;\n"
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = metaloom(
        "budget",
        "--weights-bytes",
        "1GB",
        "--kv-bytes-per-token",
        "1000",
        "--platform",
        "darwin",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["ceiling_bytes"] == 36 * 2**30
    assert data["ram_bytes"] == 48 * 2**30


def test_budget_errors_are_one_line() -> None:
    no_ceiling = metaloom(
        "budget", "--weights-bytes", "1GB", "--kv-bytes-per-token", "10", "--platform", "linux"
    )
    assert no_ceiling.returncode == 2
    assert no_ceiling.stderr.strip() == (
        "metaloom budget: error: cannot read the wired ceiling on linux (no iogpu sysctl): "
        "pass --wired-limit-mb N (or --ram SIZE for the macOS default of that machine)"
    )
    no_model = metaloom("budget", "--wired-limit-mb", "1024", "--platform", "linux")
    assert no_model.returncode == 2 and "MODEL_DIR" in no_model.stderr
    missing = metaloom("budget", "/nonexistent/model", "--wired-limit-mb", "1024")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr + no_model.stderr


def test_patchset_check_subcommand(tmp_path):
    from pathlib import Path

    reference = Path(__file__).parents[1] / "patchsets" / "graceful-oom"
    ok = metaloom("patchset", "check", str(reference))
    assert ok.returncode == 0, ok.stderr
    assert "OK, applies to mlx-lm" in ok.stdout
    bad = tmp_path / "bad.diff"
    bad.write_text("not a diff\n")
    failed = metaloom("patchset", "check", str(bad))
    assert failed.returncode == 1 and "not a unified diff" in failed.stderr
