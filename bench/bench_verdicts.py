"""Verdict stability: the default matrix N times per configuration, verdict changes counted.

A verdict that changes between identical runs is a verdict decided by timing, not by
the server. Each configuration (stock / the reference patch set, with and without the
guard) runs ``pytest --metal-oom`` N times in a subprocess; every scenario's outcome is
compared with its first run. ``--hog`` adds busy loops on every core for the whole run
(the loaded-CI-runner case). Timings are printed, never asserted.

Run: python bench/bench_verdicts.py [--runs 10] [--hog] [--config stock,graceful-oom+guard]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "stock": [],
    "stock+guard": ["--metaloom-guard"],
    "graceful-oom": [f"--metaloom-patch-set={ROOT / 'patchsets' / 'graceful-oom'}"],
    "graceful-oom+guard": [
        f"--metaloom-patch-set={ROOT / 'patchsets' / 'graceful-oom'}",
        "--metaloom-guard",
    ],
}


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    while not stop.is_set():
        for _ in range(100_000):
            pass


class Hog:
    """Busy loops on ``cores`` CPUs until stopped (the loaded-runner condition)."""

    def __init__(self, cores: int) -> None:
        self.stop = multiprocessing.Event()
        self.procs = [
            multiprocessing.Process(target=_spin, args=(self.stop,), daemon=True)
            for _ in range(cores)
        ]

    def __enter__(self) -> Hog:
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def run_once(extra: list[str], filters: list[str], timeout: float) -> tuple[dict, float, int]:
    """One ``pytest --metal-oom`` run; returns ({scenario id: outcome}, seconds, exit code)."""
    with tempfile.TemporaryDirectory(prefix="bench-verdicts-") as tmp:
        report = Path(tmp) / "report.json"
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "--metal-oom",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--metaloom-report={report}",
            "--rootdir",
            tmp,
            *extra,
            *filters,
        ]
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        took = time.perf_counter() - started
        if not report.exists():
            raise SystemExit(f"no report from {' '.join(argv)}:\n{proc.stdout[-3000:]}")
        rows = json.loads(report.read_text())["scenarios"]
    return {f"{r['id']}[{r['patch_set']}]": r["outcome"] for r in rows}, took, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--config", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument("--hog", action="store_true", help="busy loops on every core")
    parser.add_argument("--faults", default="", help="narrow the matrix (comma-separated)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    filters = [f"--metaloom-faults={args.faults}"] if args.faults else []
    cores = os.cpu_count() or 2
    summary: dict[str, dict] = {}
    with Hog(cores) if args.hog else _Nothing():
        for name in [c for c in args.config.split(",") if c]:
            if name not in CONFIGS:
                raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
            first: dict[str, str] | None = None
            changes: Counter[str] = Counter()
            seconds: list[float] = []
            for run in range(args.runs):
                outcomes, took, code = run_once(CONFIGS[name], filters, args.timeout)
                seconds.append(took)
                if first is None:
                    first = outcomes
                for key, outcome in outcomes.items():
                    if first.get(key) != outcome:
                        changes[key] += 1
                        print(f"  {name} run {run + 1}: {key}: {first.get(key)} -> {outcome}")
                print(
                    f"{name} run {run + 1}/{args.runs}: {len(outcomes)} rows, {took:.1f} s, "
                    f"exit {code}",
                    flush=True,
                )
            summary[name] = {
                "runs": args.runs,
                "rows": len(first or {}),
                "verdict_changes": sum(changes.values()),
                "changed_rows": dict(changes),
                "seconds_min": round(min(seconds), 1),
                "seconds_max": round(max(seconds), 1),
                "outcomes": Counter((first or {}).values()),
            }
    print(json.dumps({"hog_cores": cores if args.hog else 0, "configs": summary}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
