"""The default OOM matrix: one shared server vs a fresh server per scenario.

Side by side in one run, as a ratio; also the time from a fault firing to its verdict
(p50/p95 per outcome class). Run: python bench/bench_matrix.py [--faults a,b]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pytest_metaloom.matrix.runner import ScenarioRunner
from pytest_metaloom.matrix.scenarios import build_matrix
from pytest_metaloom.server.live import LiveServer
from pytest_metaloom.server.model import ModelSpec, build_tiny_model


def run_matrix(model, scenarios, *, fresh: bool, overlay=None) -> tuple[float, list]:
    """Shared: one server, a warm spare swapped in when a scenario kills or wedges it
    (what ``pytest --metal-oom`` does). Fresh: a new server for every scenario."""

    def new_server() -> LiveServer:
        run_dir = tempfile.mkdtemp(prefix="bench-matrix-")
        return LiveServer(run_dir=run_dir, model=model, overlay=overlay)

    started = time.perf_counter()
    runner = ScenarioRunner(
        new_server().start(), deadline=20.0, make_spare=None if fresh else new_server
    )
    results = []
    try:
        for scenario in scenarios:
            if fresh:
                runner.server.restart()
            results.append(runner.run(scenario))
        return time.perf_counter() - started, results
    finally:
        runner.close()
        runner.server.stop()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--faults", default="")
    parser.add_argument("--patch-set", default=None, help="e.g. patchsets/graceful-oom")
    args = parser.parse_args()
    scenarios = build_matrix(faults=[f for f in args.faults.split(",") if f])
    model = build_tiny_model(ModelSpec())
    overlay = None
    if args.patch_set:
        from pytest_metaloom.patchset.manifest import load_patch_set
        from pytest_metaloom.patchset.overlay import build_overlay

        overlay = build_overlay(load_patch_set(args.patch_set), Path(tempfile.mkdtemp()))
    print(f"patch set: {args.patch_set or 'none (installed mlx-lm)'}")
    shared_time, shared = run_matrix(model, scenarios, fresh=False, overlay=overlay)
    fresh_time, fresh = run_matrix(model, scenarios, fresh=True, overlay=overlay)
    print(f"scenarios: {len(scenarios)}")
    print(f"shared server : {shared_time:6.1f} s")
    print(f"fresh servers : {fresh_time:6.1f} s")
    print(f"ratio shared/fresh: {shared_time / fresh_time:.2f}")
    same = sum(a.outcome.outcome == b.outcome.outcome for a, b in zip(shared, fresh, strict=True))
    print(f"same outcome in both modes: {same}/{len(scenarios)}")
    by_class: dict[str, list[float]] = {}
    for result in shared:
        by_class.setdefault(result.outcome.outcome, []).append(result.timings["fault_to_verdict"])
    print("fault -> verdict (shared server):")
    for name, values in sorted(by_class.items()):
        print(
            f"  {name:14s} n={len(values):2d} p50={statistics.median(values) * 1000:7.0f} ms "
            f"p95={percentile(values, 0.95) * 1000:7.0f} ms"
        )


if __name__ == "__main__":
    main()
