"""The scenario matrix as data: coverage, narrowing, ids, and seed-derived requests."""

from __future__ import annotations

import pytest

from pytest_metaloom.inject.faults import FAULT_KINDS, PATHS, SITES
from pytest_metaloom.matrix.runner import ScenarioRunner
from pytest_metaloom.matrix.scenarios import (
    MEMORY_LIMIT,
    STREAM_MODES,
    TOOL_LOOP_MEMORY,
    Scenario,
    build_matrix,
)


def test_default_matrix_covers_every_dimension_without_the_cross_product():
    scenarios = build_matrix()
    full = build_matrix(full=True)
    assert len(scenarios) < len(full) / 4
    singles = [s for s in scenarios if s.workload == "single"]
    assert {s.fault for s in singles} == set(FAULT_KINDS)
    assert {s.semantics for s in singles} == {"abort", "deferred", "sync"}
    assert {s.path for s in singles} == set(PATHS)
    assert {s.stream for s in singles} == {True, False}
    assert {s.site for s in singles} == set(SITES)
    assert {s.workload for s in scenarios} == {"single", "tool_loop", "cycles"}
    for kind in FAULT_KINDS:  # both MLX semantics of every command-buffer kind
        sems = {s.semantics for s in singles if s.fault == kind}
        expected = set(FAULT_KINDS[kind].allowed_semantics)
        if FAULT_KINDS[kind].family == "command_buffer":
            expected = {"abort", "deferred"}  # sync is explicit only
        assert sems == expected
    assert len({s.id for s in scenarios}) == len(scenarios)


def test_full_matrix_is_the_cross_product():
    full = [s for s in build_matrix(full=True) if s.workload == "single"]
    per_kind = {
        k: len(v.allowed_semantics) - (v.family == "command_buffer") for k, v in FAULT_KINDS.items()
    }
    expected = sum(per_kind.values()) * len(PATHS) * len(STREAM_MODES) * len(SITES)
    assert len(full) == expected


def test_filters_narrow_and_typos_fail():
    only = build_matrix(faults=["cmdbuf_oom"], semantics=["abort"], paths=["sequential"])
    assert only and all(
        s.fault == "cmdbuf_oom" and s.semantics == "abort" and s.path == "sequential" for s in only
    )
    with pytest.raises(ValueError, match="did you mean 'decode'"):
        build_matrix(sites=["decod"])


def test_specs_target_one_request_and_parse():
    from pytest_metaloom.inject.faults import parse_spec

    for scenario in build_matrix(full=True):
        spec = scenario.spec("req-1")
        parse_spec(spec)
        if scenario.workload == "single":
            assert "request=req-1" in spec and f"site={scenario.site}" in spec


def test_default_matrix_is_memory_caused_and_counts_stay_an_option():
    for scenario in build_matrix():
        spec = scenario.spec("req-1")
        if scenario.workload == "tool_loop":
            assert f"memory={TOOL_LOOP_MEMORY}" in spec
        else:
            assert f"memory={MEMORY_LIMIT}" in spec
    for scenario in build_matrix(trigger="count"):
        if scenario.workload != "tool_loop":  # the tool loop is about growing memory
            assert "memory=" not in scenario.spec("req-1")
    with pytest.raises(ValueError, match="did you mean 'count'"):
        build_matrix(trigger="cuont")


def test_command_buffer_sync_rows_only_when_asked_and_explicit_in_the_spec():
    rows = build_matrix(faults=["cmdbuf_oom"], semantics=["sync"])
    assert rows and all(s.semantics == "sync" for s in rows)
    assert all("cmdbuf_oom(sync)" in s.spec("r") for s in rows)
    assert "resource_limit@" in build_matrix(faults=["resource_limit"])[0].spec("r")


def test_same_seed_same_requests():
    scenario = Scenario("cmdbuf_oom", "abort", "batched", False, "decode")
    runner = ScenarioRunner(None, seed=3)
    first, second = runner.request_id(scenario), runner.request_id(scenario)
    assert first != second  # every request of a run is distinct
    replay = ScenarioRunner(None, seed=3)
    assert [replay.request_id(scenario), replay.request_id(scenario)] == [first, second]
    assert ScenarioRunner(None, seed=4).request_id(scenario) != first


def test_bystanders_only_where_requests_share_the_batch():
    """The sequential path serves one request at a time: nothing is in flight beside the
    affected request there, so a bystander could only answer before or after the fault."""
    for scenario in build_matrix(full=True):
        if scenario.workload == "single":
            assert scenario.bystanders == (1 if scenario.path == "batched" else 0), scenario.id


def test_a_fault_after_the_stream_started_waits_for_its_bystander():
    """The affected stream goes first; the fault needs the bystander's ordinal active too,
    since the bystander's tokens would satisfy ``after_tokens`` on their own."""
    late = Scenario("resource_limit", "sync", "batched", True, "decode")
    assert late.affected_first
    assert "after_tokens=2" in late.spec("r") and "nth_request=2" in late.spec("r")
    for other in (
        Scenario("resource_limit", "sync", "batched", False, "decode"),
        Scenario("resource_limit", "sync", "batched", True, "prefill"),
        Scenario("resource_limit", "sync", "sequential", True, "decode", bystanders=0),
    ):
        assert not other.affected_first and "nth_request" not in other.spec("r"), other.id
