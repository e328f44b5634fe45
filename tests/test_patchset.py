"""Patch-set manifests, overlays and ``git apply`` against the installed mlx-lm.

Everything here is real: the installed mlx-lm package is copied and patched with git.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import threading
import warnings
from pathlib import Path

import pytest
from support import wait_until

from pytest_metaloom.inject import faults
from pytest_metaloom.patchset.check import check_patch_set, patchset_check_main
from pytest_metaloom.patchset.manifest import OVERLAY_MARKER, PatchSetError, load_patch_set
from pytest_metaloom.patchset.overlay import build_overlay, installed_mlx_lm, server_env

REPO = Path(__file__).resolve().parents[1]
GRACEFUL = REPO / "patchsets" / "graceful-oom"
GRACEFUL_DIFF = GRACEFUL / "0001-server-graceful-gpu-oom.diff"

pytest_plugins = ["pytester"]

GOOD_MANIFEST = """
name = "demo"
description = "a demo"
[base]
mlx_lm = ">=0.32,<0.33"
semantics = ["deferred"]
[[patches]]
file = "0001-demo.diff"
upstream = "ml-explore/mlx-lm#1"
[claims]
faults = ["cmdbuf_oom", "resource_limit"]
semantics = ["deferred"]
paths = ["batched"]
stream = [false]
"""


def _tiny_diff(old: str, new: str, line: int) -> str:
    """A diff replacing line ``line`` (expected to read ``old``) of mlx_lm/server.py by ``new``.

    Built with difflib from the installed file, with ``old`` substituted first, so a wrong
    ``old`` yields a diff whose context does not match the installed copy.
    """
    package, _ = installed_mlx_lm()
    lines = (package / "server.py").read_text().splitlines(keepends=True)
    before = [*lines[: line - 1], old + "\n", *lines[line:]]
    after = [*lines[: line - 1], new + "\n", *lines[line:]]
    return "".join(difflib.unified_diff(before, after, "a/mlx_lm/server.py", "b/mlx_lm/server.py"))


def _hunk_header(diff: str) -> str:
    return next(line for line in diff.splitlines() if line.startswith("@@"))


def _server_line(prefix: str) -> tuple[int, str]:
    package, _ = installed_mlx_lm()
    for number, text in enumerate((package / "server.py").read_text().splitlines(), 1):
        if text.startswith(prefix):
            return number, text
    raise AssertionError(f"no line starting with {prefix!r} in the installed server.py")


def _write_set(root: Path, manifest: str, diff: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "patchset.toml").write_text(manifest)
    if diff is None:
        number, text = _server_line("def get_system_fingerprint")
        diff = _tiny_diff(text, text + "  # demo", number)
    (root / "0001-demo.diff").write_text(diff)
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- manifests ------------------------------------------------------------------------


def test_good_manifest_parses(tmp_path: Path) -> None:
    ps = load_patch_set(_write_set(tmp_path / "demo", GOOD_MANIFEST))
    assert ps.name == "demo"
    assert ps.description == "a demo"
    assert [p.path.name for p in ps.patches] == ["0001-demo.diff"]
    assert ps.patches[0].upstream == "ml-explore/mlx-lm#1"
    assert ps.semantics == {"deferred", "sync"}  # sync is always implied
    assert ps.base_specifier is not None and ps.base_specifier.contains("0.32.2")
    assert ps.claims_scenario("cmdbuf_oom", "deferred", "batched", False)
    assert not ps.claims_scenario("cmdbuf_oom", "deferred", "batched", True)
    assert not ps.claims_scenario("cmdbuf_oom", "sync", "batched", False)
    assert not ps.claims_scenario("gpu_hang", "deferred", "batched", False)
    assert not ps.claims_scenario("resource_limit", "deferred", "sequential", False)


def test_unknown_top_level_key_names_file_key_and_valid_keys(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "demo", GOOD_MANIFEST + 'colour = "blue"\n')
    # a top-level key after [claims] lands in the claims table in TOML
    with pytest.raises(PatchSetError) as info:
        load_patch_set(root)
    message = str(info.value)
    assert str(root / "patchset.toml") in message
    assert "'claims.colour'" in message
    assert "faults, semantics, paths, stream" in message


def test_unknown_key_in_patches_entry(tmp_path: Path) -> None:
    manifest = GOOD_MANIFEST.replace('upstream = "ml-explore/mlx-lm#1"', 'upstrem = "x"')
    with pytest.raises(PatchSetError, match=r"unknown key 'patches\[0\]\.upstrem'.*file, upstream"):
        load_patch_set(_write_set(tmp_path / "demo", manifest))


def test_unknown_fault_name_lists_valid_names(tmp_path: Path) -> None:
    manifest = GOOD_MANIFEST.replace('"cmdbuf_oom", "resource_limit"', '"cmdbuf_om"')
    with pytest.raises(PatchSetError) as info:
        load_patch_set(_write_set(tmp_path / "demo", manifest))
    message = str(info.value)
    assert "'cmdbuf_om'" in message and "claims.faults" in message
    for name in faults.FAULT_KINDS:
        assert name in message


def test_bad_semantics_is_rejected(tmp_path: Path) -> None:
    manifest = GOOD_MANIFEST.replace('semantics = ["deferred"]\n[[', 'semantics = ["later"]\n[[')
    with pytest.raises(PatchSetError) as info:
        load_patch_set(_write_set(tmp_path / "demo", manifest))
    message = str(info.value)
    assert "'later'" in message and "base.semantics" in message
    for name in faults.SEMANTICS:
        assert name in message


def test_bad_stream_and_bad_version_specifier(tmp_path: Path) -> None:
    bad_stream = GOOD_MANIFEST.replace("stream = [false]", 'stream = ["no"]')
    with pytest.raises(PatchSetError, match="claims.stream"):
        load_patch_set(_write_set(tmp_path / "a", bad_stream))
    bad_base = GOOD_MANIFEST.replace('">=0.32,<0.33"', '"the latest"')
    with pytest.raises(PatchSetError, match="base.mlx_lm"):
        load_patch_set(_write_set(tmp_path / "b", bad_base))


def test_missing_diff_file_is_named(tmp_path: Path) -> None:
    manifest = GOOD_MANIFEST.replace("0001-demo.diff", "0002-missing.diff")
    with pytest.raises(PatchSetError, match=r"0002-missing\.diff does not exist"):
        load_patch_set(_write_set(tmp_path / "demo", manifest))


def test_missing_claims_table_claims_nothing(tmp_path: Path) -> None:
    manifest = GOOD_MANIFEST.split("[claims]")[0]
    ps = load_patch_set(_write_set(tmp_path / "demo", manifest))
    assert not ps.claims_scenario("cmdbuf_oom", "deferred", "batched", False)


def test_single_diff_claims_everything() -> None:
    ps = load_patch_set(GRACEFUL_DIFF)
    assert ps.name == GRACEFUL_DIFF.stem
    assert len(ps.patches) == 1
    for kind in faults.FAULT_KINDS:
        for sem in faults.SEMANTICS:
            for path in faults.PATHS:
                for stream in (True, False):
                    assert ps.claims_scenario(kind, sem, path, stream)


def test_stock_claims_nothing_and_has_no_overlay(tmp_path: Path) -> None:
    ps = load_patch_set("stock")
    assert ps.is_stock and ps.patches == ()
    assert not any(
        ps.claims_scenario(kind, sem, path, stream)
        for kind in faults.FAULT_KINDS
        for sem in faults.SEMANTICS
        for path in faults.PATHS
        for stream in (True, False)
    )
    assert build_overlay(ps, tmp_path) is None
    assert server_env(None) == {}


def test_claims_scenario_rejects_unknown_names() -> None:
    with pytest.raises(PatchSetError, match="valid names"):
        load_patch_set("stock").claims_scenario("oom", "sync", "batched", False)


def test_not_a_patch_set(tmp_path: Path) -> None:
    with pytest.raises(PatchSetError, match="not found"):
        load_patch_set(tmp_path / "nope.diff")
    text = tmp_path / "notes.diff"
    text.write_text("just words\n")
    with pytest.raises(PatchSetError, match="not a unified diff"):
        load_patch_set(text)
    with pytest.raises(PatchSetError, match="no patchset.toml"):
        load_patch_set(tmp_path)


def test_reference_manifest_claims_sync_and_deferred_not_abort() -> None:
    ps = load_patch_set(GRACEFUL)
    assert ps.name == "graceful-oom"
    assert ps.patches[0].upstream == "ml-explore/mlx-lm#1034"
    for kind in ("cmdbuf_oom", "resource_limit", "unable_to_allocate", "runtime_error"):
        for path in faults.PATHS:
            for stream in (True, False):
                assert ps.claims_scenario(kind, "sync", path, stream)
                assert ps.claims_scenario(kind, "deferred", path, stream)
                assert not ps.claims_scenario(kind, "abort", path, stream)
    # A blocked evaluation cannot be answered from inside the process.
    assert not ps.claims_scenario("hang", "sync", "batched", False)


# -- overlays -------------------------------------------------------------------------


def test_reference_patch_applies_and_site_packages_is_untouched(tmp_path: Path) -> None:
    package, version = installed_mlx_lm()
    before = _sha(package / "server.py")
    overlay = build_overlay(load_patch_set(GRACEFUL), tmp_path)
    assert overlay is not None and (overlay / OVERLAY_MARKER).is_file()
    patched = (overlay / "mlx_lm" / "server.py").read_text()
    assert "def gpu_memory_error_code" in patched
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in patched
    assert "trim_to(n_sequences=0)" in patched
    assert _sha(package / "server.py") == before
    assert _sha(overlay / "mlx_lm" / "generate.py") == _sha(package / "generate.py")
    env = server_env(overlay, {"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(overlay), "/x"]


def test_overlay_is_cached_and_rebuilt_on_content_change(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "demo", GOOD_MANIFEST)
    first = build_overlay(load_patch_set(root), tmp_path / "overlays")
    assert first is not None
    stamp = first / "mlx_lm" / "stamp"
    stamp.write_text("kept")  # a rebuild would lose this
    second = build_overlay(load_patch_set(root), tmp_path / "overlays")
    assert second == first and stamp.read_text() == "kept"
    number, text = _server_line("def get_system_fingerprint")
    (root / "0001-demo.diff").write_text(_tiny_diff(text, text + "  # changed", number))
    third = build_overlay(load_patch_set(root), tmp_path / "overlays")
    assert third != first
    assert "# changed" in (third / "mlx_lm" / "server.py").read_text()
    # no scratch directories left behind
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == sorted(
        [first.name, third.name]
    )


def test_concurrent_builders_get_one_complete_overlay(tmp_path: Path) -> None:
    ps = load_patch_set(GRACEFUL)
    results: list[Path | None] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_overlay(ps, tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_diff_that_does_not_apply_names_set_diff_file_and_hunk(tmp_path: Path) -> None:
    number, text = _server_line("def get_system_fingerprint")
    diff = _tiny_diff(text + " and something else", text, number)
    root = _write_set(tmp_path / "demo", GOOD_MANIFEST, diff)
    with pytest.raises(PatchSetError) as info:
        build_overlay(load_patch_set(root), tmp_path / "overlays")
    message = str(info.value)
    assert "'demo'" in message
    assert "0001-demo.diff" in message
    assert "mlx_lm/server.py" in message
    assert f"'{_hunk_header(diff)}'" in message
    assert "\n" not in message
    assert not (tmp_path / "overlays").exists() or not any((tmp_path / "overlays").iterdir())


def test_file_missing_from_the_package_is_named(tmp_path: Path) -> None:
    diff = "--- a/mlx_lm/nope.py\n+++ b/mlx_lm/nope.py\n@@ -1,1 +1,1 @@\n-a\n+b\n"
    root = _write_set(tmp_path / "demo", GOOD_MANIFEST, diff)
    with pytest.raises(PatchSetError, match=r"0001-demo\.diff.*mlx_lm/nope\.py"):
        build_overlay(load_patch_set(root), tmp_path / "overlays")


def test_files_outside_the_package_are_skipped_and_reported(tmp_path: Path) -> None:
    number, text = _server_line("def get_system_fingerprint")
    diff = _tiny_diff(text, text + "  # pr", number) + (
        "--- a/tests/test_server.py\n+++ b/tests/test_server.py\n@@ -1,1 +1,1 @@\n-a\n+b\n"
    )
    pr = tmp_path / "pr.diff"
    pr.write_text(diff)
    summary = check_patch_set(pr)
    assert "skipped outside mlx_lm/: tests/test_server.py" in summary


def test_version_mismatch_is_an_error_naming_both_versions(tmp_path: Path) -> None:
    ps = load_patch_set(GRACEFUL)
    with pytest.raises(PatchSetError) as info:
        build_overlay(ps, tmp_path, mlx_lm_version="0.31.3")
    assert str(info.value) == (
        "patch set graceful-oom is for mlx-lm 0.32.2, installed is 0.31.3; install the "
        "matching mlx-lm or pass --metaloom-allow-version-mismatch"
    )
    assert not any(tmp_path.iterdir())


def test_version_mismatch_downgrades_to_a_warning(tmp_path: Path) -> None:
    ps = load_patch_set(GRACEFUL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        overlay = build_overlay(ps, tmp_path, mlx_lm_version="0.31.3", allow_version_mismatch=True)
    assert overlay is not None and (overlay / "mlx_lm" / "server.py").is_file()
    assert any("installed is 0.31.3" in str(w.message) for w in caught)


def test_syntax_error_after_patching_is_reported(tmp_path: Path) -> None:
    number, text = _server_line("def get_system_fingerprint")
    root = _write_set(tmp_path / "demo", GOOD_MANIFEST, _tiny_diff(text, "def broken(:", number))
    with pytest.raises(PatchSetError, match=rf"syntax error at line {number}"):
        build_overlay(load_patch_set(root), tmp_path / "overlays")


# -- check ----------------------------------------------------------------------------


def test_check_patch_set_on_the_reference_set() -> None:
    _, version = installed_mlx_lm()
    summary = check_patch_set(GRACEFUL)
    assert summary.startswith(f"patch set 'graceful-oom' ({GRACEFUL}): OK, applies to mlx-lm")
    assert version in summary.splitlines()[0]
    assert "0001-server-graceful-gpu-oom.diff (ml-explore/mlx-lm#1034): mlx_lm/server.py" in (
        summary
    )
    assert re.search(
        r"claims: faults .*cmdbuf_oom.*; semantics (deferred, sync|sync, deferred);", summary
    )


def test_check_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patchset_check_main([str(GRACEFUL)]) == 0
    assert "OK" in capsys.readouterr().out
    assert patchset_check_main([str(GRACEFUL), "--mlx-lm-version", "0.31.3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "installed is 0.31.3" in err
    assert (
        patchset_check_main(
            [str(GRACEFUL), "--mlx-lm-version", "0.31.3", "--allow-version-mismatch"]
        )
        == 0
    )
    assert "warning: patch set graceful-oom is for mlx-lm 0.32.2" in capsys.readouterr().out
    assert patchset_check_main([str(tmp_path / "missing.diff")]) == 1
    assert "not found" in capsys.readouterr().err
    assert patchset_check_main(["stock"]) == 0


# -- the installed mlx-lm against the reference set's base (tox -e mlx031 runs these) ----


def _installed_fits_the_reference_base() -> bool:
    return load_patch_set(GRACEFUL).base_specifier.contains(installed_mlx_lm()[1])


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    _installed_fits_the_reference_base(),
    reason="needs an mlx-lm outside graceful-oom's base 0.32.2 (run tox -e mlx031)",
)
def test_matrix_refuses_the_reference_set_off_its_base(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clear base-version error on the set's scenarios, not a crash of the session."""
    _, version = installed_mlx_lm()
    expected = (
        f"patch set graceful-oom is for mlx-lm 0.32.2, installed is {version}; install the "
        "matching mlx-lm or pass --metaloom-allow-version-mismatch"
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        f"--metaloom-patch-set={GRACEFUL}",
        "--metaloom-faults=runtime_error",
        "--metaloom-paths=sequential",
        timeout=90,
    )
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output, output
    assert f"PatchSetError: {expected}" in output
    # One scenario (runtime_error, sequential, one site and stream mode), failed, not run.
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert patchset_check_main([str(GRACEFUL)]) == 1
    assert capsys.readouterr().err.strip() == f"metaloom patchset check: error: {expected}"


@pytest.mark.timeout(120)
def test_default_command_buffer_semantics_follow_the_installed_mlx(
    tmp_path: Path, model_dir: Path
) -> None:
    """Why the set's base says ``deferred``: below mlx 0.32 the same fault kills the process."""
    import mlx.core as mx

    from pytest_metaloom.judge import workload
    from pytest_metaloom.server.live import LiveServer

    expected = faults.default_semantics(mx.__version__)
    with LiveServer(run_dir=tmp_path / "run", model=model_dir, name="semantics") as server:
        started = server.injector.wait_for("started", timeout=5.0)
        assert started["semantics_default"] == expected
        server.arm("1*cmdbuf_oom@path=sequential")  # no semantics given: the version default
        obs = workload.chat(server.url, workload.single_turn("hi"), seed=1, deadline=20)
        fired = server.injector.wait_for("fired", timeout=5.0)
        assert fired["semantics"] == expected
        if expected == "abort":
            wait_until(lambda: not server.is_alive())
            assert server.returncode == -6 and not obs.ok
            assert faults.abort_line(faults.message("cmdbuf_oom", "abort")) in server.log_text()
        else:
            assert server.is_alive() and obs.status != 200  # stock: request lost, not killed
