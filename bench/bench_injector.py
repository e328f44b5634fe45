"""Throughput cost of the injector: none vs loaded-not-armed vs armed-never-fires.

Runs three real ``mlx_lm.server`` processes side by side (same tiny model, same
prompts), sends rounds of concurrent batched non-stream requests to each in turn
(interleaved, so shifting machine load hits all three alike) and reports the
median tokens/s over the repetitions, plus ratios against the baseline.

    .venv/bin/python bench/bench_injector.py [--reps 5] [--requests 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pytest_metaloom.inject.injector import Injector, bootstrap_env
from pytest_metaloom.server.model import ModelSpec, build_tiny_model
from pytest_metaloom.server.process import ServerProcess

NEVER_FIRES = "1*cmdbuf_oom@wired=1TiB"


def _one(port: int, prompt: str, max_tokens: int) -> int:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"benchmark request failed with {resp.status}: {data}")
        return int(data["usage"]["completion_tokens"])
    finally:
        conn.close()


def _round(port: int, prompts: list[str], max_tokens: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(lambda p: _one(port, p, max_tokens), prompts))
    return tokens / (time.perf_counter() - start)


def _measure_all(model: Path, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Start all three servers, then interleave rounds so machine load hits them alike."""
    modes = ("none", "loaded", "armed")
    envs = {m: ({} if m == "none" else bootstrap_env(work / m)) for m in modes}
    servers = {
        m: ServerProcess(model=model, env=envs[m], log_dir=work / m, name=m, ready_timeout=90)
        for m in modes
    }
    prompts = [f"prompt number {i} about apples and pears" for i in range(args.requests)]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for srv in servers.values():
            srv.start()
        Injector.from_env(envs["armed"]).arm(NEVER_FIRES)
        for m in modes:
            _round(servers[m].port, prompts, args.max_tokens)  # warm-up
        for rep in range(args.reps):
            # rotate the order each round: no mode always runs first (or last)
            for m in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
                rates[m].append(_round(servers[m].port, prompts, args.max_tokens))
        if Injector.from_env(envs["armed"]).disarm()["fired"]:
            raise RuntimeError("the never-firing trigger fired; the benchmark is invalid")
    finally:
        for srv in servers.values():
            srv.stop()
    return {m: statistics.median(r) for m, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    # Stock mlx_lm.server keeps socketserver's listen backlog of 5: far more concurrent
    # connects than ~8 get reset, which would measure the backlog, not the injector.
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model = build_tiny_model(ModelSpec())
    with tempfile.TemporaryDirectory(prefix="mlm-bench-") as tmp:
        results = _measure_all(model, args, Path(tmp))
    base = results["none"]
    print(f"{'mode':<8} {'tokens/s (median)':>18} {'ratio':>7}")
    for mode, rate in results.items():
        print(f"{mode:<8} {rate:>18.1f} {rate / base:>7.3f}")


if __name__ == "__main__":
    main()
