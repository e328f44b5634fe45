"""Start-up cost: the fixture's server start-to-ready vs the bare import of mlx_lm.server.

Side by side in one run, as ratios. Run: python bench/bench_startup.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from pytest_metaloom.server.live import LiveServer
from pytest_metaloom.server.model import ModelSpec, build_tiny_model


def bare_import() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mlx_lm.server"], check=True, timeout=120)
    return time.perf_counter() - started


def server_ready(model) -> float:
    started = time.perf_counter()
    with LiveServer(run_dir=tempfile.mkdtemp(prefix="bench-"), model=model):
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = build_tiny_model(ModelSpec())
    imports, readies = [], []
    for _ in range(args.rounds):
        imports.append(bare_import())
        readies.append(server_ready(model))
    imp, ready = statistics.median(imports), statistics.median(readies)
    print(f"bare 'import mlx_lm.server':       {imp * 1000:7.0f} ms (median of {args.rounds})")
    print(f"fixture start -> ready (warm-up):  {ready * 1000:7.0f} ms")
    print(f"ratio ready / bare import:         {ready / imp:7.2f}")
    print(f"fixture overhead beyond import:    {(ready - imp) * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
