"""Same verdict, any load: a matrix subset judged alike on an idle and a saturated CPU.

Every bound a verdict waits on scales from latency the server shows moments before, so
busy loops on every core may slow the run but must not change a single row. The
subset covers each kind of verdict path: synchronous OOM on both generation paths and
stream modes, abort and deferred command-buffer failures, the tool loop, the
fault/recover cycles, a non-OOM error and an injected hang.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

GRACEFUL = Path(__file__).parents[1] / "patchsets" / "graceful-oom"
SUBSET = "--metaloom-faults=resource_limit,cmdbuf_oom,runtime_error,hang"


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _outcomes(pytester: pytest.Pytester, name: str) -> dict[str, str]:
    report = pytester.path / f"{name}.json"
    pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--metal-oom",
        f"--metaloom-report={report}",
        f"--metaloom-patch-set={GRACEFUL}",
        SUBSET,
    )
    rows = json.loads(report.read_text())["scenarios"]
    return {row["id"]: row["outcome"] for row in rows}


def test_matrix_verdicts_are_the_same_with_every_core_busy(pytester: pytest.Pytester) -> None:
    idle = _outcomes(pytester, "idle")
    stop = multiprocessing.Event()
    hogs = [
        multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
        for _ in range(max(2, os.cpu_count() or 2))
    ]
    for hog in hogs:
        hog.start()
    try:
        loaded = _outcomes(pytester, "loaded")
    finally:
        stop.set()
        for hog in hogs:
            hog.join(10)
            if hog.is_alive():
                hog.kill()
    assert idle and set(idle) == set(loaded)
    changed = {k: (idle[k], loaded[k]) for k in idle if idle[k] != loaded[k]}
    assert not changed, f"verdicts changed under load (idle -> loaded): {changed}"
    # the subset exercised more than one class: a run that judged everything alike
    # for a trivial reason (nothing fired) would also be "stable"
    assert "not_fired" not in idle.values()
    assert {"graceful", "aborted", "hang"} <= set(idle.values())
