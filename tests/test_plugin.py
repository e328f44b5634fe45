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
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--metal-oom", "--collect-only", "--metaloom-faults=hang"
    )
    result.stdout.fnmatch_lines(["metaloom: *, mlx 0.*, mlx-lm 0.*, backend cpu*model: built-in*"])
    # the pinned environment's mlx-lm is inside the tested window: no warning
    result.stdout.no_fnmatch_line("*outside the tested window*")


def test_header_warns_when_mlx_lm_is_outside_the_tested_window():
    from pytest_metaloom.versions import TESTED_MLX_LM, mlx_lm_window_warning

    assert mlx_lm_window_warning("0.32.2") is None
    assert mlx_lm_window_warning("0.31.3") is None
    for version in ("0.33.0", "0.30.9", "1.0.0", "not-a-version"):
        warning = mlx_lm_window_warning(version)
        assert warning and version in warning and TESTED_MLX_LM in warning
    assert "not installed" in (mlx_lm_window_warning("") or "")


def test_settings_defaults_come_from_the_option_table():
    from pytest_metaloom.config import Settings
    from pytest_metaloom.options import convert
    from pytest_metaloom.server import process

    settings = Settings()
    assert list(Settings.__dataclass_fields__) == [option.dest for option in OPTIONS]
    for option in OPTIONS:
        assert getattr(settings, option.dest) == convert(option, None), option.dest
    assert process.DEFAULT_START_TIMEOUT == settings.metaloom_start_timeout
    assert process.DEFAULT_READY_TIMEOUT == settings.metaloom_ready_timeout
    assert process.DEFAULT_STOP_TIMEOUT == settings.metaloom_stop_timeout
    # real-device mode: headroom, turn words and max turns are read from the table too
    from pytest_metaloom.matrix import realdevice, realmetal
    from pytest_metaloom.options import BY_DEST, TURN_WORDS
    from pytest_metaloom.units import parse_size

    device, metal = realdevice.RealDevicePlan(), realmetal.RealMetalPlan()
    assert device.headroom == realdevice.DEFAULT_HEADROOM == parse_size(settings.metaloom_headroom)
    assert device.max_turns == metal.max_turns == settings.metaloom_max_turns
    assert device.turn_words == metal.document_words == TURN_WORDS["metal"]
    help_text = BY_DEST["metaloom_turn_words"].help
    assert f"{TURN_WORDS['metal']} on Metal, {TURN_WORDS['cuda']} on CUDA" in help_text


REAL_DEVICE_DEFAULTS = ("metaloom_headroom", "metaloom_turn_words", "metaloom_max_turns")


def test_real_device_defaults_have_no_second_copy():
    """A literal copy of these defaults anywhere in the package (``or "3GiB"``, a
    ``DEFAULT_MAX_TURNS = 24``, a turn-words table) would drift from the option table."""
    import ast
    from pathlib import Path

    import pytest_metaloom
    from pytest_metaloom.options import BY_DEST, TURN_WORDS

    names = {"turn_words", "max_turns", "headroom"}
    names |= {f"default_{name}" for name in names}
    texts = {
        BY_DEST[d].default for d in REAL_DEVICE_DEFAULTS if isinstance(BY_DEST[d].default, str)
    }
    numbers = {*TURN_WORDS.values(), BY_DEST["metaloom_max_turns"].default}
    found = []
    for path in sorted(Path(pytest_metaloom.__file__).parent.rglob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and node.value in texts
                and isinstance(node.value, str)
            ):
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                named = {getattr(t, "id", getattr(t, "attr", "")).lower() for t in targets}
                literals = [
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and type(c.value) is int and c.value in numbers
                ]
                if named & names and literals:
                    found.append(f"{path.name}:{node.lineno} {sorted(named)} = {literals}")
            if isinstance(node, ast.Dict):  # a {"metal": 120, "cuda": 1400} elsewhere
                values = [v.value for v in node.values if isinstance(v, ast.Constant)]
                if values and set(values) == set(TURN_WORDS.values()):
                    found.append(f"{path.name}:{node.lineno} {values}")
    assert found == []


PROJECT_TESTS = """
import signal, sys

def test_untouched():
    # nothing of metaloom's is active in a project that does not use it
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert "mlx" not in sys.modules and "mlx_lm" not in sys.modules

def test_fails():
    assert 1 == 2
"""


def _outcome_lines(result) -> list[str]:
    """The run's output without the lines that differ between any two runs."""
    keep = []
    for line in result.outlines:
        if line.startswith(("plugins:", "rootdir:", "platform ")) or " in " in line:
            continue
        keep.append(line)
    return keep


def test_a_plain_run_of_an_unrelated_project_is_unchanged(pytester, monkeypatch):
    tmp = pytester.path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("METALOOM_CACHE_DIR", str(pytester.path / "models"))
    pytester.makepyfile(test_project=PROJECT_TESTS)
    args = ["-p", "no:cacheprovider", f"--basetemp={pytester.path / 'base'}"]
    with_plugin = pytester.runpytest_subprocess(*args)
    without = pytester.runpytest_subprocess(*args, "-p", "no:metaloom")
    with_plugin.assert_outcomes(passed=1, failed=1)
    without.assert_outcomes(passed=1, failed=1)
    assert _outcome_lines(with_plugin) == _outcome_lines(without)
    assert not any("metaloom" in line for line in _outcome_lines(with_plugin))
    assert list(tmp.iterdir()) == []  # no temp dir, no port claims, no socket dirs
    assert not (pytester.path / "models").exists()  # no model built


def test_metal_oom_runs_the_matrix_only_unless_test_paths_are_named(pytester):
    pytester.makeini("[pytest]\ntestpaths = tests\n")
    tests = pytester.mkdir("tests")
    (tests / "test_project.py").write_text("def test_project_own():\n    assert False\n")
    args = ["-p", "no:cacheprovider", "--metal-oom", "--metaloom-faults=hang", "--collect-only"]
    only = pytester.runpytest_subprocess(*args, "-q")
    only.stdout.fnmatch_lines(["*hang-*[[]installed]", "1 test collected*"])
    only.stdout.no_fnmatch_line("*test_project_own*")
    only.stdout.no_fnmatch_line("*testpaths*")
    named = pytester.runpytest_subprocess(*args, "-q", "tests")
    named.stdout.fnmatch_lines(["*test_project_own*", "*hang-*[[]installed]", "2 tests collected*"])
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    plain.stdout.fnmatch_lines(["*test_project_own*", "1 test collected*"])


def test_collecting_the_matrix_builds_and_starts_nothing(pytester, monkeypatch):
    tmp = pytester.path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("METALOOM_CACHE_DIR", str(pytester.path / "models"))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--metal-oom", "--collect-only"
    )
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*collected*"])
    assert not (pytester.path / "models").exists(), "the model was built at collection"
    assert list(tmp.iterdir()) == [], "collection left temp files"


def test_matrix_items_and_live_tests_are_bounded_by_pytest_timeout(pytester):
    from pytest_metaloom.config import Settings
    from pytest_metaloom.matrix.pool import item_timeout

    pytester.makeconftest(
        """
        def pytest_collection_finish(session):
            for item in session.items:
                marker = item.get_closest_marker("timeout")
                print("TIMEOUT", item.name, marker.args if marker else None)
        """
    )
    pytester.makepyfile(
        test_live="""
        import pytest

        def test_uses_a_server(mlx_server_factory):
            pass

        @pytest.mark.timeout(7)
        def test_own_timeout(mlx_server_factory):
            pass

        def test_no_server():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--collect-only",
        "-s",
        "--metal-oom",
        "--metaloom-deadline=5",
        "--metaloom-faults=hang",
        "test_live.py",
    )
    bound = item_timeout(Settings(metaloom_deadline=5.0))
    assert bound < item_timeout(Settings())  # derived from the deadline
    result.stdout.fnmatch_lines(
        [
            f"TIMEOUT test_uses_a_server ({bound},)",
            "TIMEOUT test_own_timeout (7,)",
            "TIMEOUT test_no_server None",
            f"TIMEOUT hang-*[[]installed] ({bound},)",
        ]
    )
    # a timeout the user configured is respected for live tests
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", "-s", "--timeout=33", "test_live.py"
    )
    result.stdout.fnmatch_lines(["TIMEOUT test_uses_a_server None"])


def test_an_in_process_run_leaves_the_outer_sessions_servers_alone(pytester, mlx_server_factory):
    from support import fake_server_cmd

    outer = mlx_server_factory(command=fake_server_cmd(), warmup=False)
    pytester.makepyfile(
        test_inner="""
        def test_inner(mlx_server_factory):
            from support import fake_server_cmd
            server = mlx_server_factory(command=fake_server_cmd(), warmup=False)
            assert server.is_alive()
        """
    )
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parent))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--metaloom-stop-timeout=2")
    result.assert_outcomes(passed=1)
    assert outer.is_alive(), "the inner session stopped the outer session's server"
    import signal

    from pytest_metaloom.fixtures import _raise_interrupt

    assert signal.getsignal(signal.SIGTERM) is _raise_interrupt  # the outer handler stays


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


def test_a_bad_option_value_is_a_usage_error_naming_where_it_came_from(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_METALOOM_DEADLINE", "soon")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--metal-oom")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--metaloom-deadline*PYTEST_METALOOM_DEADLINE*'soon'*"])


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
