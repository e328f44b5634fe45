"""Each fault kind fails when MLX would: pinned in a fresh interpreter per case.

The runtime is installed into a child Python (so wrapping ``mlx.core`` never leaks into
the test process) that evaluates real arrays on the CPU backend and reports what it saw
as JSON. Only the failure itself is simulated; evaluation, memory counters, streams,
threads and signals are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pytest_metaloom

PACKAGE_ROOT = Path(pytest_metaloom.__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

PRELUDE = """
import json, os, sys, threading, time
import mlx.core as mx
from pytest_metaloom.inject.runtime import patches, state
EVENTS = sys.argv[1]
rt = state.Runtime({"METALOOM_EVENTS": EVENTS})
patches.patch_mlx(rt)
x = mx.random.normal((1024, 1024))
mx.eval(x)
out = {}
def report():
    print(json.dumps(out), flush=True)
def attempt(fn):
    try:
        fn()
        return None
    except RuntimeError as exc:
        return str(exc)
"""


def run(tmp_path: Path, body: str, *, expect_rc: int = 0) -> tuple[dict[str, Any], list[dict]]:
    events = tmp_path / "events.jsonl"
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(events)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    evs = [json.loads(ln) for ln in events.read_text().splitlines()] if events.exists() else []
    result["_stderr"] = proc.stderr
    result["_stdout"] = proc.stdout
    return result, evs


def fired(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "fired"]


def test_allocator_fault_raises_instead_of_evaluating(tmp_path: Path) -> None:
    out, events = run(
        tmp_path,
        """
        y = x @ x                       # 4 MiB that exist only once evaluated
        before = mx.get_active_memory()
        rt.arm("1*unable_to_allocate")
        out["error"] = attempt(lambda: mx.eval(y))
        out["grew_while_failing"] = mx.get_active_memory() - before
        rt.disarm()
        mx.eval(y)                      # the same graph evaluates once the fault is gone
        out["grew_after"] = mx.get_active_memory() - before
        out["nbytes"] = y.nbytes
        report()
        """,
    )
    assert out["error"].startswith("[malloc] Unable to allocate ")
    assert out["grew_while_failing"] < out["nbytes"] // 2  # nothing was materialised
    assert out["grew_after"] >= out["nbytes"]
    assert fired(events)[0]["timing"] == "instead"


def test_cuda_variant_carries_mlx_cuda_allocator_text(tmp_path: Path) -> None:
    out, events = run(
        tmp_path,
        """
        rt.arm("1*unable_to_allocate(cuda)")
        out["error"] = attempt(lambda: mx.eval(x + 1))
        report()
        """,
    )
    assert out["error"] == "cudaMallocAsync(&data, size, stream) failed: out of memory"
    assert fired(events)[0]["message"] == out["error"]


def test_command_buffer_sync_raises_from_the_committing_evaluation_after_the_work(
    tmp_path: Path,
) -> None:
    out, events = run(
        tmp_path,
        """
        y = x @ x
        before = mx.get_active_memory()
        rt.arm("1*cmdbuf_oom(sync)")
        out["error"] = attempt(lambda: mx.eval(y))
        out["grew"] = mx.get_active_memory() - before
        out["nbytes"] = y.nbytes
        report()
        """,
    )
    assert out["error"].endswith("kIOGPUCommandBufferCallbackErrorOutOfMemory).")
    assert out["grew"] >= out["nbytes"]  # the buffer ran: its outputs exist
    assert fired(events)[0]["timing"] == "after"


@pytest.mark.parametrize(
    "sync_point",
    ["z.item()", "z.tolist()", "mx.synchronize()", "mx.eval(x + 2)", "mx.async_eval(x + 3)"],
)
def test_deferred_error_is_parked_and_surfaces_at_the_next_sync_point_of_its_stream(
    tmp_path: Path, sync_point: str
) -> None:
    out, events = run(
        tmp_path,
        f"""
        rt.arm("1*cmdbuf_oom(deferred)")
        z = (x * 3).sum()
        out["commit"] = attempt(lambda: mx.async_eval(z))   # returns: nothing waits
        rt.disarm()
        seen = []
        def other_thread():                                   # its own default stream
            seen.append(attempt(lambda: mx.eval(mx.ones(4) * 2)))
        t = threading.Thread(target=other_thread); t.start(); t.join()
        out["other_thread"] = seen[0]
        out["at_sync_point"] = attempt(lambda: {sync_point})
        out["after"] = attempt(lambda: mx.eval(x + 5))       # raised once, then cleared
        report()
        """,
    )
    assert out["commit"] is None
    assert out["other_thread"] is None
    assert out["at_sync_point"].endswith("kIOGPUCommandBufferCallbackErrorOutOfMemory).")
    assert out["after"] is None
    (f,) = fired(events)
    (raised,) = [e for e in events if e["event"] == "raised"]
    assert f["timing"] == "parked" and f["op"] == "async_eval"
    assert raised["stream"] == f["stream"]
    assert raised["op"] == sync_point.split("(")[0].split(".")[-1]


def test_deferred_error_of_a_waiting_evaluation_surfaces_at_its_own_end(tmp_path: Path) -> None:
    out, events = run(
        tmp_path,
        """
        y = x @ x
        before = mx.get_active_memory()
        rt.arm("1*cmdbuf_oom(deferred)")
        out["error"] = attempt(lambda: mx.eval(y))
        out["grew"] = mx.get_active_memory() - before
        out["nbytes"] = y.nbytes
        report()
        """,
    )
    assert out["error"].endswith(").")
    assert out["grew"] >= out["nbytes"]
    raised = [e for e in events if e["event"] == "raised"]
    assert raised and raised[0]["op"] == "eval"


def test_abort_comes_after_the_evaluation_returned_from_a_native_thread(tmp_path: Path) -> None:
    out, events = run(
        tmp_path,
        """
        rt.arm("1*cmdbuf_oom(abort)")
        z = (x * 3).sum()
        mx.async_eval(z)
        t_returned = time.time()
        print("returned", flush=True)
        names = [t.name for t in threading.enumerate()]
        for i in range(200):                    # Python runs on until the signal lands
            print(json.dumps({"alive_after_commit": i, "t": time.time(),
                              "t_returned": t_returned, "threads": names}), flush=True)
            time.sleep(0.002)
        """,
        expect_rc=-signal.SIGABRT,
    )
    assert out["alive_after_commit"] >= 0  # Python printed after the evaluation returned
    assert (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        in (out["_stderr"])
    )
    assert out["threads"] == ["MainThread"]  # the killer is no threading.Thread
    (f,) = fired(events)
    (dying,) = [e for e in events if e["event"] == "dying"]
    assert f["timing"] == "abort" and f["op"] == "async_eval"
    assert f["commit_t"] <= out["t_returned"] < dying["death_t"]
    assert dying["death_t"] >= f["death_due_t"]


def test_limits_lowered_by_an_arming_are_restored_on_disarm(tmp_path: Path) -> None:
    out, events = run(
        tmp_path,
        """
        original = mx.set_memory_limit(1 << 40)
        rt.arm("1*unable_to_allocate@memory=allocated+1MiB")
        lowered = mx.set_memory_limit(1 << 40)
        mx.set_memory_limit(lowered)
        result = rt.disarm()
        out["lowered"] = lowered
        out["restored_to"] = mx.set_memory_limit(1 << 40)
        out["expected"] = 1 << 40
        out["restored"] = result["restored"]
        report()
        """,
    )
    assert out["lowered"] < out["expected"]
    assert out["restored_to"] == out["expected"]
    assert out["restored"] == {"memory": out["expected"]}
    assert [e["source"] for e in events if e["event"] == "limits"] == ["arm", "restore"]


def test_memory_point_fires_when_the_evaluation_would_cross_the_lowered_limit(
    tmp_path: Path,
) -> None:
    out, events = run(
        tmp_path,
        """
        rt.arm("1*unable_to_allocate@memory=allocated+2MiB")
        out["small"] = attempt(lambda: mx.eval(mx.ones((16, 16))))      # 1 KiB: under
        big = mx.ones((1024, 1024))                                     # 4 MiB: over
        out["big"] = attempt(lambda: mx.eval(big))
        report()
        """,
    )
    assert out["small"] is None
    assert out["big"] is not None
    crossing = fired(events)[0]["crossing"]
    assert crossing["limit"] == "memory" and crossing["counter"] == "peak+requested"
    assert crossing["requested"] == 4 * 1024 * 1024
    assert crossing["value"] > crossing["limit_bytes"]
    assert crossing["over_by"] == crossing["value"] - crossing["limit_bytes"]


# An array MLX already evaluated, or committed with mx.async_eval, needs no new buffer:
# an evaluation of only such arrays just waits, so no allocator can fail there.
WAITS = ["s.item()", "s.tolist()", "mx.eval(s)", "mx.eval([x, s])", "z.item()", "mx.async_eval(z)"]


@pytest.mark.parametrize("wait", WAITS)
def test_allocator_fault_holds_at_a_wait_and_fires_at_the_next_evaluation_that_computes(
    tmp_path: Path, wait: str
) -> None:
    out, events = run(
        tmp_path,
        f"""
        s = x.sum(); mx.eval(s)               # evaluated: its buffer exists
        z = (x * 3).sum(); mx.async_eval(z)   # committed: its buffers were allocated then
        rt.arm("1*resource_limit")
        out["wait"] = attempt(lambda: {wait})
        out["again"] = attempt(lambda: {wait})
        out["computes"] = attempt(lambda: mx.eval(x + 1))
        out["point"] = rt.disarm()["points"][0]
        report()
        """,
    )
    assert out["wait"] is None and out["again"] is None
    assert out["computes"] == "[metal::malloc] Resource limit (499000) exceeded."
    (f,) = fired(events)
    assert (f["op"], f["timing"], f["held"]) == ("eval", "instead", 2)
    assert out["point"]["hits"] == 1 and out["point"]["fired"] == 1


def test_memory_crossing_seen_first_at_a_wait_fires_at_the_next_allocating_evaluation(
    tmp_path: Path,
) -> None:
    out, events = run(
        tmp_path,
        """
        rt.arm("1*unable_to_allocate@memory=allocated+2MiB")
        z = (x @ x).sum()                     # asks for 4 bytes; 4 MiB on the way
        out["commit"] = attempt(lambda: mx.async_eval(z))   # under the limit when asked
        mx.synchronize()                      # the work ran: the peak counter caught up
        out["peak_over"] = mx.get_peak_memory() - mx.get_active_memory()
        out["wait"] = attempt(lambda: z.item())             # over, but nothing to allocate
        out["next"] = attempt(lambda: mx.eval(x + 1))       # allocates: fails here
        report()
        """,
    )
    assert out["commit"] is None and out["wait"] is None
    assert out["peak_over"] >= 4 * 1024 * 1024
    assert out["next"] is not None and out["next"].startswith("[malloc] Unable to allocate ")
    (f,) = fired(events)
    assert (f["op"], f["held"]) == ("eval", 1)
    assert f["crossing"]["requested"] == 4 * 1024 * 1024


def test_parked_command_buffer_error_still_surfaces_at_a_wait_holding_an_allocator_fault(
    tmp_path: Path,
) -> None:
    out, events = run(
        tmp_path,
        """
        rt.arm("1*cmdbuf_oom(deferred)")
        z = (x * 3).sum()
        out["commit"] = attempt(lambda: mx.async_eval(z))   # the buffer fails: parked
        rt.arm("1*resource_limit")
        out["at_item"] = attempt(lambda: z.item())   # a wait is a sync point: it surfaces
        out["again"] = attempt(lambda: z.item())     # cleared; nothing to allocate
        out["next"] = attempt(lambda: mx.eval(x + 1))
        report()
        """,
    )
    assert out["commit"] is None
    assert out["at_item"].endswith("kIOGPUCommandBufferCallbackErrorOutOfMemory).")
    assert out["again"] is None
    assert out["next"] == "[metal::malloc] Resource limit (499000) exceeded."
    (raised,) = [e for e in events if e["event"] == "raised"]
    assert raised["op"] == "item"
    parked, instead = fired(events)
    assert parked["timing"] == "parked" and instead["op"] == "eval"


def test_held_fault_fires_on_the_same_hit_with_the_same_draw(tmp_path: Path) -> None:
    """A held evaluation is no hit and takes no draw: a seeded ``P%off->kind`` chain
    fires on the hit its seed says (``_first_loss`` in the live tests); when that hit is
    a wait, at the allocating evaluation right after it."""
    import random

    rng, expected = random.Random(8), 1
    while rng.random() * 100 < 70:
        expected += 1
    assert expected == 2  # seed 8: the 2nd hit (a wait in the second run); the 3rd draw
    # would not fire, so firing right after the wait shows the draw was not used up
    out, _ = run(
        tmp_path,
        """
        s = x.sum(); mx.eval(s)
        def first_failure(with_waits):
            rt.arm("70%off->1*unable_to_allocate@seed=8")
            for n in range(1, 60):
                if with_waits:                 # hit 1: s.item(), hit 2: mx.eval(s)
                    assert attempt(lambda: s.item()) is None
                    assert attempt(lambda: mx.eval(s)) is None
                if attempt(lambda: mx.eval(x + n)) is not None:
                    return n, rt.disarm()["points"][0]
        out["plain"] = first_failure(False)
        out["with_waits"] = first_failure(True)
        report()
        """,
    )
    n, point = out["plain"]
    assert (n, point["hits"], point["held"]) == (expected, expected, 0)
    n, point = out["with_waits"]
    assert (n, point["hits"], point["held"]) == (1, expected, 1)
