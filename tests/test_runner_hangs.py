"""Bounds from measurement, and honest hangs against a real mlx_lm.server.

The bounds are unit-tested as arithmetic (no wall clock); the hang is driven live: the
injected hang must not be released before the verdict, the recovery probe must meet the
stuck server, and the stuck server must be replaced by a spare afterwards.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from pytest_metaloom.matrix.bounds import Bounds, cpu_progress
from pytest_metaloom.matrix.runner import ScenarioRunner
from pytest_metaloom.matrix.scenarios import Scenario
from pytest_metaloom.server.live import LiveServer


def test_stall_bound_scales_from_the_worst_recent_latency_with_a_floor_and_a_cap():
    bounds = Bounds(floor=2.0, multiplier=20.0, cap=60.0)
    assert bounds.latency is None and bounds.stall == 2.0  # nothing measured: the floor
    bounds.record(0.05)
    assert bounds.stall == 2.0  # 20 x 0.05 = 1 s is below the floor
    bounds.record(0.5)
    assert bounds.stall == 10.0 and bounds.latency == 0.5
    bounds.record(9.0)
    assert bounds.stall == 60.0  # capped by the deadline
    for _ in range(5):  # only the last five samples count: the slow one ages out
        bounds.record(0.2)
    assert bounds.stall == pytest.approx(4.0)


def test_guard_gets_more_room_and_the_client_waits_for_the_guard():
    bounds = Bounds(floor=2.0, multiplier=20.0, cap=60.0)
    assert bounds.guard_hang > bounds.stall
    assert bounds.client_stall(guard=True) > 2 * bounds.guard_hang  # hang + its probe
    assert bounds.client_stall(guard=False) == bounds.stall
    assert bounds.deadline(guard=False) == 60.0


@pytest.mark.parametrize("field", ["floor", "multiplier", "cap"])
def test_bad_bounds_name_the_option_to_fix(field):
    with pytest.raises(ValueError, match="--metaloom-stall-floor"):
        Bounds(**{field: 0.0})


def test_cpu_progress_counts_the_work_of_a_process_tree():
    assert cpu_progress(None) is None
    counter = cpu_progress(os.getpid())
    assert counter is not None
    before = counter()
    total = 0
    while counter() - before < 0.05:  # burns CPU until the counter moved: no clock read
        total += sum(range(10_000))
    assert counter() > before


def test_an_injected_hang_stays_hung_until_its_verdict_then_the_server_is_replaced(
    model_dir, tmp_path
):
    def new_server() -> LiveServer:
        return LiveServer(run_dir=tempfile.mkdtemp(prefix="hang-", dir=tmp_path), model=model_dir)

    first = new_server().start()
    runner = ScenarioRunner(first, make_spare=new_server, spares=1)
    try:
        result = runner.run(Scenario("hang", "sync", "batched", True, "decode"))
        facts = result.outcome.facts
        assert result.outcome.outcome == "hang", result.outcome.reasons
        assert facts.fired and facts.alive and facts.timed_out
        # the recovery probe met the stuck server (and ended the recovery phase)
        assert facts.recovery_hung and facts.recovery_statuses == [None]
        names = [e["event"] for e in result.events]
        assert "fired" in names and "disarmed" not in names  # not released before the verdict
        assert runner.server is not first and not first.is_alive()  # replaced by a spare
        released = [e["event"] for e in first.events()]
        assert "disarmed" in released  # released only after the verdict, then stopped
        after = runner.run(Scenario("runtime_error", "sync", "batched", False, "decode"))
        assert after.outcome.facts.alive and after.outcome.facts.fired  # the spare serves
    finally:
        runner.close()
        runner.server.stop()
        first.stop()
