"""The plugin itself, tested the pytest way: through pytester in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_metaloom.options import OPTIONS

pytestmark = pytest.mark.timeout(240)


def test_every_option_is_a_flag_and_an_ini_key(pytester):
    result = pytester.runpytest_subprocess("--help")
    text = result.stdout.str()
    for option in OPTIONS:
        assert option.flag in text
        assert option.ini in text
        assert option.ini.startswith("metaloom_")


def test_entry_module_imports_nothing_heavy():
    code = (
        "import sys, pytest_metaloom.plugin\n"
        "heavy = [m for m in ('mlx', 'mlx.core', 'mlx_lm', 'transformers', 'numpy', 'requests')"
        " if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_metal_oom_nothing_is_collected(pytester):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.stdout.no_fnmatch_line("*metaloom::*")


def test_report_header_names_versions_backend_and_model(pytester):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["metaloom: *, mlx 0.*, mlx-lm 0.*, backend cpu*model: built-in*"])


def test_settings_resolve_cli_over_env_over_ini(pytester, monkeypatch):
    pytester.makeini("[pytest]\nmetaloom_deadline = 5\nmetaloom_faults = hang\n")
    pytester.makepyfile(
        """
        def test_settings(metaloom_settings):
            print("DEADLINE", metaloom_settings.metaloom_deadline)
            print("FAULTS", metaloom_settings.metaloom_faults)
        """
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*DEADLINE 5.0", "FAULTS ['hang']"])
    monkeypatch.setenv("PYTEST_METALOOM_DEADLINE", "7")
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*DEADLINE 7.0"])
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "--metaloom-deadline=9")
    result.stdout.fnmatch_lines(["*DEADLINE 9.0"])


def test_mlx_server_fixture_serves_and_failing_test_shows_log(pytester, model_dir):
    pytester.makepyfile(
        """
        from pytest_metaloom.judge import workload

        def test_serves(mlx_server):
            obs = workload.chat(mlx_server.url, workload.single_turn(), max_tokens=3)
            assert obs.ok and obs.status == 200
            assert mlx_server.is_alive() and mlx_server.pid

        def test_fails_and_shows_log(mlx_server):
            assert False, "on purpose"
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--metaloom-model={model_dir}"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*metaloom server log (mlx_server)*", "*Starting httpd*"])


def test_url_mode_reuses_a_running_server_and_fails_clearly_when_nothing_listens(
    pytester, model_dir, tmp_path
):
    from pytest_metaloom.server.process import ServerProcess

    pytester.makepyfile(
        """
        from pytest_metaloom.judge import workload

        def test_uses_it(mlx_server, metaloom_settings):
            assert mlx_server.url == metaloom_settings.metaloom_url.rstrip("/")
            assert mlx_server.pid is None  # not started by metaloom
            assert workload.chat(mlx_server.url, workload.single_turn(), max_tokens=2).ok
        """
    )
    with ServerProcess(model=model_dir, log_dir=tmp_path) as server:
        url = server.url
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--metaloom-url={url}")
        result.assert_outcomes(passed=1)
        assert server.is_alive()  # nothing stopped it
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--metaloom-url={url}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*nothing answers at*"])


def test_bad_matrix_filter_is_a_usage_error(pytester):
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--metal-oom", "--metaloom-faults=cmdbuf_om"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown fault kind 'cmdbuf_om'*did you mean 'cmdbuf_oom'*"])


def _run_matrix(pytester, *args):
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--metal-oom", f"--metaloom-report={report}", *args
    )
    data = json.loads(report.read_text())
    return result, {(s["id"], s["patch_set"]): s for s in data["scenarios"]}, data


def test_stock_matrix_reports_the_measured_classes(pytester):
    """Against stock mlx-lm 0.32.2 the oracle must report what was measured upstream."""
    result, rows, data = _run_matrix(
        pytester, "--metaloom-faults=resource_limit,cmdbuf_oom", "--metaloom-stream=nostream"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # stock is not graceful: honest failure
    assert data["mlx_lm"] == "0.32.2" and data["backend"] == "cpu"
    for (scenario_id, _), row in rows.items():
        facts = row["facts"]
        assert facts["fired"], scenario_id
        if row["semantics"] == "abort":
            assert row["outcome"] == "aborted" and facts["returncode"] == -6, row
        elif row["path"] == "batched":
            assert row["outcome"] == "wedged", row
            assert 404 in facts["recovery_statuses"] and facts["health_after_recovery"] == 503
        else:
            assert row["outcome"] == "request_lost", row
            assert facts["health_after_recovery"] == 200
            assert facts["cached_tokens_after"], "stock never resets its prompt cache"
        assert row["reproduce"].startswith("pytest --metal-oom -k ")
    result.stdout.fnmatch_lines(["*metaloom: Metal OOM matrix*", "*installed: * scenarios*"])


def test_patch_sets_side_by_side_claims_and_gaps(pytester):
    from pathlib import Path

    graceful = Path(__file__).parents[1] / "patchsets" / "graceful-oom"
    result, rows, data = _run_matrix(
        pytester,
        "--metaloom-faults=resource_limit,cmdbuf_oom,runtime_error",
        "--metaloom-stream=nostream",
        "--metaloom-patch-set=stock",
        f"--metaloom-patch-set={graceful}",
        "-p",
        "no:randomly",
    )
    assert data["patch_sets"] == ["stock", str(graceful)]
    stock = [r for (_, ps), r in rows.items() if ps == "stock"]
    patched = [r for (_, ps), r in rows.items() if ps == "graceful-oom"]
    assert stock and all(r["verdict"] == "expected gap" and not r["claimed"] for r in stock)
    for row in patched:
        if row["semantics"] == "abort":
            assert not row["claimed"] and row["outcome"] == "aborted"
        else:
            assert row["claimed"] and row["outcome"] == "graceful", row
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*stock*graceful-oom*"])


def test_junit_xml_carries_outcomes_as_properties(pytester):
    junit = pytester.path / "junit.xml"
    pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        "--metaloom-faults=runtime_error",
        "--metaloom-paths=sequential",
        f"--junitxml={junit}",
    )
    xml = junit.read_text()
    assert 'name="metaloom_outcome" value="request_lost"' in xml
    assert 'name="metaloom_verdict"' in xml


def test_xdist_runs_the_matrix_with_one_combined_report(pytester):
    result, rows, _ = _run_matrix(
        pytester, "-n", "2", "--metaloom-faults=resource_limit,runtime_error"
    )
    from pytest_metaloom.matrix.scenarios import build_matrix

    assert len(rows) == len(build_matrix(faults=["resource_limit", "runtime_error"]))
    assert {r["outcome"] for r in rows.values()} <= {"wedged", "request_lost"}


def test_guard_turns_stock_aborts_into_graceful_restarts(pytester):
    result, rows, _ = _run_matrix(
        pytester,
        "--metaloom-guard",
        "--metaloom-faults=cmdbuf_oom",
        "--metaloom-semantics=abort",
        "--metaloom-paths=batched",
    )
    assert rows, "no scenario ran"
    for row in rows.values():
        facts = row["facts"]
        assert row["outcome"] == "graceful", row
        assert facts["worker_restarted"] and facts["status"] == 503 and facts["alive"]
        assert row["guard"] is True
    assert result.ret == pytest.ExitCode.OK


def test_guard_with_the_reference_patch_set_makes_every_kind_graceful(pytester):
    """In-process where the patch handles it, by restart where it cannot (abort, hang)."""
    from pathlib import Path

    graceful = Path(__file__).parents[1] / "patchsets" / "graceful-oom"
    result, rows, _ = _run_matrix(
        pytester,
        "--metaloom-guard",
        f"--metaloom-patch-set={graceful}",
        "--metaloom-faults=cmdbuf_oom,resource_limit,hang",
        "--metaloom-paths=batched",
        "--metaloom-stream=stream",
    )
    assert rows
    for row in rows.values():
        assert row["outcome"] == "graceful", row
        restarted = row["facts"]["worker_restarted"]
        assert restarted == (row["semantics"] == "abort" or row["fault"] == "hang"), row
