"""Fidelity on a real GPU: the real out-of-memory against the simulated one, row by row.

Run on a machine where MLX's CUDA backend works (one ``device`` call does it all):

    python bench/real_gpu.py --out "$OUT"

For each scenario that a real GPU can produce (batched and sequential path, stream and
non-stream, a failure during prefill of a growing tool loop and one during decode) and
each server build (stock mlx-lm, ``patchsets/graceful-oom``, stock behind the guard),
it runs the workload twice on fresh, identical servers:

- **real**: a headroom helper holds all but ``--headroom`` of the GPU and MLX's
  allocator fails by itself (``matrix/realdevice.py``);
- **simulated**: nothing is held; the project's injector raises its CUDA-text fault on
  the same request of the same workload.

Both are judged by the same oracle. The table (``fidelity.md`` and ``fidelity.json``
in ``--out``) says, per row, the two outcomes and whether they agree, with the date,
GPU, driver and versions. Rows are written as they finish, so a run cut short still
leaves its table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_metaloom.inject.faults import FAULT_KINDS, parse_size  # noqa: E402
from pytest_metaloom.matrix.realdevice import (  # noqa: E402
    CudaPressure,
    Pressure,
    RealDevicePlan,
    run_real_device,
)
from pytest_metaloom.server.headroom import HeadroomHelper, release_all  # noqa: E402
from pytest_metaloom.server.live import LiveServer  # noqa: E402
from pytest_metaloom.server.model import ModelSpec, build_tiny_model, spec_from_text  # noqa: E402

LARGE = ModelSpec(
    layers=8,
    hidden_size=1024,
    heads=8,
    kv_heads=8,
    intermediate_size=2048,
    max_position_embeddings=1 << 20,
)


@dataclass(frozen=True)
class Row:
    """One scenario of the table: a path, a stream mode and where the memory runs out."""

    path: str
    stream: bool
    site: str

    @property
    def id(self) -> str:
        mode = "stream" if self.stream else "nostream"
        work = "tool_loop" if self.site == "prefill" else "long_generation"
        return f"{self.path}-{mode}-{self.site}-{work}"


ROWS = [
    Row(path, stream, site)
    for site in ("prefill", "decode")
    for path in ("batched", "sequential")
    for stream in (False, True)
]
TARGETS = ("stock", "graceful-oom", "guard")


# ---------------------------------------------------------------------- environment


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("mlx", "mlx-cuda-13", "mlx-lm", "transformers", "torch", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    gpu = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": gpu,
        "cuda_driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "versions": versions,
        "commit": os.environ.get("METALOOM_COMMIT", ""),
        "model": asdict(LARGE),
    }


# ---------------------------------------------------------------------- servers


class Servers:
    """Fresh, identical servers per run, started ahead in parallel.

    No server may start while the helper holds the GPU (its start would eat the
    headroom), so every server a phase needs is started before the phase begins.
    """

    def __init__(self, model: Path, overlays: dict[str, Path | None], workdir: Path) -> None:
        self.model = model
        self.overlays = overlays
        self.workdir = workdir
        self.all: list[LiveServer] = []

    def new(self, target: str, name: str) -> LiveServer:
        server = LiveServer(
            run_dir=Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)),
            model=self.model,
            overlay=self.overlays.get(target),
            guard=target == "guard",
            guard_options={"max_restarts": 100},
            name=name,
            start_timeout=300,
            ready_timeout=300,
        )
        self.all.append(server)
        return server

    def start_many(self, wanted: list[tuple[str, str]], workers: int) -> dict[str, Any]:
        servers = {name: self.new(target, name) for target, name in wanted}
        results: dict[str, Any] = {}

        def start(name: str) -> None:
            try:
                results[name] = servers[name].start()
            except Exception as exc:  # reported in the row, the run goes on
                results[name] = exc

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(start, servers))
        return results

    def stop_all(self) -> None:
        for server in self.all:
            with contextlib.suppress(Exception):
                server.stop()


# ---------------------------------------------------------------------- one run


def injector_names_state_eval_cache() -> bool:
    """Whether this injector calls a prompt-cache state evaluation ``cache`` (it does once
    sites are MLX evaluation points) or, as before, ``prefill``."""
    import importlib.util

    try:
        return importlib.util.find_spec("pytest_metaloom.inject.runtime.locate") is not None
    except ModuleNotFoundError:  # runtime is a module, not a package: the older injector
        return False


def default_variant(kind: str) -> str | None:
    """The CUDA text of ``kind`` when this injector has one."""
    variants = getattr(FAULT_KINDS[kind], "variants", None) or {}
    return "cuda" if "cuda" in variants else None


def sim_site(row: Row, real_site: str | None) -> str:
    """Where the injector fails the request: where the real failure was (as the stock
    server's log showed it), else the row's phase."""
    if real_site in ("prefill", "decode", "cache"):
        if real_site == "cache" and not injector_names_state_eval_cache():
            return "prefill"
        return real_site
    if row.site == "prefill" and injector_names_state_eval_cache():
        return "cache"
    return row.site


def sim_spec(
    kind: str, variant: str | None, row: Row, decode_tokens: int, site: str | None = None
) -> str:
    """The injector's fault on the failing request of the same workload."""
    args = f"({variant})" if variant else ""
    filters = [f"path={row.path}", f"site={site or row.site}", "request={rid}"]
    if (site or row.site) == "decode":
        # mid-generation, as the real one (the squeeze comes once decoding runs)
        filters.append(f"after_tokens={max(2, decode_tokens // 4)}")
    return f"1*{kind}{args}@{','.join(filters)}"


def one_run(server: Any, plan: RealDevicePlan, pressure: Pressure) -> dict[str, Any]:
    if isinstance(server, Exception):
        return {"outcome": "error", "reasons": [f"server did not start: {server}"]}
    t0 = time.monotonic()
    try:
        result = run_real_device(server, plan, pressure)
        record = result.to_dict()
        record["log_tail"] = result.log_tail[-3000:]
    except Exception as exc:
        record = {
            "outcome": "error",
            "reasons": [f"{type(exc).__name__}: {exc}"],
            "traceback": traceback.format_exc()[-3000:],
        }
    record["seconds"] = round(time.monotonic() - t0, 2)
    with contextlib.suppress(Exception):
        server.stop()
    return record


def agreement(real: dict[str, Any], sim: dict[str, Any]) -> bool | None:
    """None when there is nothing to compare (no real failure, or a run that errored)."""
    produced = ("not_fired", "skipped", "error")
    if real.get("outcome") in produced or sim.get("outcome") in produced:
        return None
    return real.get("outcome") == sim.get("outcome")


def agree_note(real: dict[str, Any], sim: dict[str, Any]) -> str:
    if real.get("outcome") == "not_fired":
        return "not produced for real on this GPU (no allocator failure within the run)"
    if real.get("outcome") == sim.get("outcome"):
        return ""
    return "differs: see the reasons in fidelity.json"


# ---------------------------------------------------------------------- the table


def write_table(out: Path, env: dict[str, Any], rows: list[dict[str, Any]], args: Any) -> None:
    doc = {"environment": env, "settings": vars(args) | {"out": str(args.out)}, "rows": rows}
    (out / "fidelity.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [
        "# Fidelity: real GPU out-of-memory vs the simulated fault",
        "",
        f"- date: {env['date']}",
        f"- GPU: {env['gpu']} (driver {env['cuda_driver']})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"- commit: {env['commit'] or 'n/a'}",
        f"- headroom {args.headroom}, turn {args.turn_words} words, "
        f"decode {args.decode_tokens} tokens",
        "",
        "| scenario | server | real outcome | simulated outcome | agree | real failure "
        "(site, where) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        real, sim = row["real"], row["simulated"]
        where = f"{real.get('site') or '-'}: {real.get('where') or '-'}"
        agree = {True: "yes", False: "no"}.get(row["agree"], "n/a")
        lines.append(
            f"| {row['scenario']} | {row['target']} | {real.get('outcome')} | "
            f"{sim.get('outcome')} | {agree} | {where} | {row['note']} |"
        )
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")


def _seen(run: dict[str, Any]) -> str:
    """What a client saw in one run: the failing request, /health, the recovery requests."""
    facts = run.get("facts") or {}
    if not facts:
        return run.get("outcome", "-")
    status = facts.get("status")
    if facts.get("stream") and status == 200:
        end = (
            "error event + [DONE]"
            if facts.get("sse_error_event") and facts.get("sse_done")
            else ("[DONE]" if facts.get("sse_done") else "no end")
        )
        failed = f"stream 200, {end}"
    else:
        failed = "no status line" if status is None else str(status)
    recovery = ", ".join(
        "none" if s is None else str(s) for s in facts.get("recovery_statuses", [])
    )
    restart = "; restarted" if facts.get("worker_restarted") else ""
    return f"{failed}; /health {facts.get('health_after_fault')}; then {recovery or '-'}{restart}"


def render_docs(doc: dict[str, Any]) -> str:
    """The table of docs/reference/fidelity.md from a fidelity.json."""
    lines = [
        "| scenario | server | real: failing request; /health; next requests | real | "
        "simulated | agree |",
        "|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        real, sim = row["real"], row["simulated"]
        agree = {True: "yes", False: "**no**"}.get(row["agree"], "n/a")
        lines.append(
            f"| `{row['scenario']}` | {row['target']} | {_seen(real)} | {real.get('outcome')} | "
            f"{sim.get('outcome')} | {agree} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--headroom", default="3GiB", help="GPU memory left free (real runs)")
    parser.add_argument("--turn-words", type=int, default=1400, help="words per tool-loop turn")
    parser.add_argument("--decode-tokens", type=int, default=1024)
    parser.add_argument("--max-turns", type=int, default=12)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--sim-fault", default="unable_to_allocate", help="injected fault kind")
    parser.add_argument(
        "--sim-variant", default="auto", help="its text variant (auto: cuda when known)"
    )
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--rows", default="", help="comma-separated row ids (default: all)")
    parser.add_argument("--overlay", default="", help="a prebuilt graceful-oom overlay")
    parser.add_argument("--sim-workers", type=int, default=4, help="simulated runs at once")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all runs")
    parser.add_argument("--workers", type=int, default=8, help="servers started at once")
    parser.add_argument(
        "--helper-cmd", default=None, help="a stand-in headroom helper command (dry runs)"
    )
    parser.add_argument(
        "--model-spec", default="large", help="'large' (the default), 'tiny' or key=value,..."
    )
    parser.add_argument("--render", type=Path, default=None, help="print a fidelity.json as docs")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render_docs(json.loads(args.render.read_text())))
        return 0
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sim_fault not in FAULT_KINDS:
        parser.error(f"--sim-fault {args.sim_fault!r} is not a fault kind: {list(FAULT_KINDS)}")
    if args.sim_variant == "auto":
        args.sim_variant = default_variant(args.sim_fault)
    headroom = parse_size(args.headroom, {"active": 0, "peak": 0, "limit": 0})
    targets = [t for t in args.targets.split(",") if t]
    rows = [r for r in ROWS if not args.rows or r.id in args.rows.split(",")]
    env = environment()
    print(json.dumps(env), flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="metaloom-gpu-"))
    spec = LARGE if args.model_spec == "large" else spec_from_text(args.model_spec)
    env["model"] = asdict(spec)
    model = build_tiny_model(spec, cache_dir=workdir / "models")
    overlays: dict[str, Path | None] = {"stock": None, "guard": None}
    if "graceful-oom" in targets:
        if args.overlay:
            overlays["graceful-oom"] = Path(args.overlay)
        else:
            from pytest_metaloom.patchset.manifest import load_patch_set
            from pytest_metaloom.patchset.overlay import build_overlay

            patch_set = load_patch_set(ROOT / "patchsets" / "graceful-oom")
            overlays["graceful-oom"] = build_overlay(patch_set, workdir / "overlays")
    servers = Servers(model, overlays, workdir)
    helper = HeadroomHelper(shlex.split(args.helper_cmd) if args.helper_cmd else None)
    records: list[dict[str, Any]] = []

    def plan_for(row: Row, **extra: Any) -> RealDevicePlan:
        return RealDevicePlan(
            path=row.path,
            stream=row.stream,
            site=row.site,
            headroom=headroom,
            turn_words=args.turn_words,
            max_turns=args.max_turns,
            decode_tokens=args.decode_tokens,
            deadline=args.deadline,
            **extra,
        )

    try:
        runs = [(row, target) for row in rows for target in targets]
        # Every server is started before the helper holds anything: a server starting
        # under the squeeze would eat the headroom of the one under test.
        t = time.monotonic()
        wanted = [
            (target, f"{kind}-{row.id}-{target}")
            for kind in ("real", "sim")
            for row, target in runs
        ]
        started = servers.start_many(wanted, args.workers)
        print(f"started {len(started)} servers in {time.monotonic() - t:.1f} s", flush=True)
        helper.start()
        print(f"helper ready: {helper.ready}", flush=True)

        # phase 1: the real failures, one at a time (one GPU, one squeeze)
        real: dict[tuple[str, str], dict[str, Any]] = {}
        for row, target in runs:
            name = f"real-{row.id}-{target}"
            if time.monotonic() - t_start > args.budget * 0.7:
                real[(row.id, target)] = {"outcome": "skipped", "reasons": ["time budget"]}
                with contextlib.suppress(Exception):
                    started[name].stop()
                continue
            record = one_run(started[name], plan_for(row), CudaPressure(helper, plan_for(row)))
            real[(row.id, target)] = record
            print(
                f"real {row.id} {target}: {record.get('outcome')} {record.get('turns')} "
                f"{record.get('site')} {record.get('error_text')} {record.get('seconds')} s",
                flush=True,
            )
        helper.stop()

        # phase 2: the simulated fault on the same workload, failing the same turn;
        # nothing is squeezed, so these may run side by side
        def simulate(item: tuple[Row, str]) -> dict[str, Any]:
            row, target = item
            name = f"sim-{row.id}-{target}"
            real_record = real[(row.id, target)]
            turns = real_record.get("turns") or []
            fail_turn = max(0, len(turns) - 1) if row.site == "prefill" else 0
            stock_site = real.get((row.id, "stock"), {}).get("site")
            site = sim_site(row, real_record.get("site") or stock_site)
            plan = plan_for(
                row,
                simulate=sim_spec(args.sim_fault, args.sim_variant, row, args.decode_tokens, site),
                simulate_turn=fail_turn,
            )
            if time.monotonic() - t_start > args.budget:
                sim = {"outcome": "skipped", "reasons": ["time budget"]}
                with contextlib.suppress(Exception):
                    started[name].stop()
            else:
                sim = one_run(started[name], plan, Pressure())
            print(f"sim  {row.id} {target}: {sim.get('outcome')} {sim.get('turns')}", flush=True)
            return {
                "scenario": row.id,
                "target": target,
                "real": real_record,
                "simulated": sim,
                "simulated_spec": plan.simulate,
                "agree": agreement(real_record, sim),
                "note": agree_note(real_record, sim),
            }

        def simulate_safely(item: tuple[Row, str]) -> dict[str, Any]:
            try:
                return simulate(item)
            except Exception as exc:  # one broken row must not lose the table
                row, target = item
                error = {"outcome": "error", "reasons": [f"{type(exc).__name__}: {exc}"]}
                return {
                    "scenario": row.id,
                    "target": target,
                    "real": real.get((row.id, target), {}),
                    "simulated": error,
                    "simulated_spec": None,
                    "agree": None,
                    "note": "the simulated run could not be made",
                }

        with ThreadPoolExecutor(args.sim_workers) as pool:
            for record in pool.map(simulate_safely, runs):
                records.append(record)
                write_table(args.out, env, records, args)
    finally:
        release_all()
        servers.stop_all()
        write_table(args.out, env, records, args)
    print((args.out / "fidelity.md").read_text(), flush=True)
    print(f"total {time.monotonic() - t_start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
