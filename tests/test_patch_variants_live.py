"""Two correct graceful-OOM patches, judged on real servers, and one-defect variants.

``graceful-oom`` (the reference set) and ``graceful-supervised`` (a fixture written in
another style: one guard around the whole generation loop) must both be ``graceful`` on
every default-matrix row they claim. Each one-defect variant (500 for an OOM, no cache
reset, a stream without ``[DONE]``, a lying ``/health``) must be caught, with the class
the defect deserves. Real ``mlx_lm.server`` processes and HTTP; the injector stands in
for the GPU failure.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from patch_variants import CASES, CORRECT, DEFECTS, DefectCase, build_variant

from pytest_metaloom.matrix.runner import ScenarioRunner
from pytest_metaloom.matrix.scenarios import Scenario, build_matrix
from pytest_metaloom.patchset.manifest import load_patch_set
from pytest_metaloom.patchset.overlay import build_overlay
from pytest_metaloom.server.live import LiveServer

pytestmark = pytest.mark.timeout(900)


def _overlay(patch_dir: Path, root: Path) -> Path:
    overlay = build_overlay(load_patch_set(patch_dir), root / "overlays")
    assert overlay is not None
    return overlay


def _runner(model: Path, overlay: Path, root: Path, *, spare: bool) -> ScenarioRunner:
    def new_server() -> LiveServer:
        run_dir = tempfile.mkdtemp(prefix="variant-", dir=root)
        return LiveServer(run_dir=run_dir, model=model, overlay=overlay)

    return ScenarioRunner(new_server().start(), make_spare=new_server if spare else None, spares=1)


def _close(runner: ScenarioRunner) -> None:
    runner.close()
    runner.server.stop()
    for old in runner.retired:
        old.stop()


@pytest.mark.parametrize("patch", sorted(CORRECT))
def test_correct_patch_is_graceful_on_every_claimed_row(
    patch: str, model_dir: Path, tmp_path: Path
) -> None:
    patch_set = load_patch_set(CORRECT[patch])
    rows = [
        s
        for s in build_matrix()
        if patch_set.claims_scenario(s.fault, s.semantics, s.path, s.stream)
    ]
    gpu = {s.fault for s in rows}
    assert "unable_to_allocate" in gpu and "cmdbuf_oom" in gpu and "runtime_error" in gpu
    assert {s.path for s in rows} == {"batched", "sequential"}
    runner = _runner(model_dir, _overlay(CORRECT[patch], tmp_path), tmp_path, spare=True)
    try:
        results = [runner.run(s) for s in rows]
    finally:
        _close(runner)
    bad = {
        r.scenario.id: (r.outcome.outcome, r.outcome.reasons)
        for r in results
        if not r.outcome.graceful
    }
    assert bad == {}
    for r in results:  # every row was memory-caused: its fired event shows the crossing
        fired = [e for e in r.events if e.get("event") == "fired"]
        assert fired and fired[0]["crossing"]["over_by"] > 0, r.scenario.id


@pytest.mark.parametrize("patch", sorted(CORRECT))
@pytest.mark.parametrize("case", CASES, ids=[c.defect for c in CASES])
def test_one_defect_variant_is_caught_with_its_class(
    patch: str, case: DefectCase, model_dir: Path, tmp_path: Path
) -> None:
    assert set(DEFECTS[patch]) == {c.defect for c in CASES}
    scenario = Scenario(*case.scenario)
    assert scenario.id in {s.id for s in build_matrix()}  # a row the correct one passes
    assert load_patch_set(CORRECT[patch]).claims_scenario(
        scenario.fault, scenario.semantics, scenario.path, scenario.stream
    )
    variant = build_variant(patch, case.defect, tmp_path)
    runner = _runner(model_dir, _overlay(variant, tmp_path), tmp_path, spare=False)
    try:
        result = runner.run(scenario)
    finally:
        _close(runner)
    assert result.outcome.outcome == case.expected, result.outcome.reasons
