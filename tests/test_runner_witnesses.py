"""The runner's witnesses against a REAL mlx_lm.server (tiny model, graceful-oom overlay).

Each test takes away, or tampers with, one thing the runner observes and checks that the
row says so: a bystander not in flight when the fault fired, a cycles row without its
memory samples, an affected request whose client failed. The server is real; only the
runner's view is narrowed (by subclassing), so each missing witness is deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_metaloom.judge import workload
from pytest_metaloom.matrix.runner import ScenarioRunner, _in_flight
from pytest_metaloom.matrix.scenarios import Scenario
from pytest_metaloom.patchset.manifest import load_patch_set
from pytest_metaloom.patchset.overlay import build_overlay
from pytest_metaloom.server.live import LiveServer

GRACEFUL = Path(__file__).resolve().parents[1] / "patchsets" / "graceful-oom"
# claimed by graceful-oom, answered 503 + a cache reset; batched, so it has a bystander
BATCHED = Scenario("resource_limit", "sync", "batched", False, "cache")


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> Path:
    return build_overlay(load_patch_set(GRACEFUL), tmp_path_factory.mktemp("overlays"))


@pytest.fixture
def graceful_server(model_dir, overlay, tmp_path):
    """A fresh server per test: a runner's probe prompts are unique per runner, and a
    server another runner warmed would answer the first, "cold" probe warm."""
    server = LiveServer(run_dir=tmp_path / "run", model=model_dir, overlay=overlay, name="witness")
    server.start()
    yield server
    server.stop()


def _runner(cls: type[ScenarioRunner], graceful_server: Any, **kwargs: Any) -> ScenarioRunner:
    # no spares: a graceful server is never replaced (a wedged one would be restarted)
    return cls(graceful_server, **kwargs)


def _fired(result: Any) -> dict:
    return next(e for e in result.events if e.get("event") == "fired")


def test_the_bystander_is_in_flight_when_the_fault_fires(graceful_server):
    """Ordered by evidence: the bystander streams before the affected request is sent,
    so the fault's event lists it; the oracle reads that, not an assumption."""
    runner = _runner(ScenarioRunner, graceful_server)
    result = runner.run(BATCHED)
    facts = result.outcome.facts
    ids = _fired(result)["request_ids"]
    assert len(ids) == 2 and any(i.endswith("-by1") for i in ids), ids
    assert facts.bystanders_in_flight == [True]
    assert facts.bystanders in (["same_error"], ["served"]), facts.bystanders
    assert result.outcome.outcome == "graceful", result.outcome.reasons


class BystanderFirst(ScenarioRunner):
    """The old hole made deterministic: the bystander's whole answer comes before the
    affected request is sent, so it was never beside the fault."""

    def _drive(self, scenario: Scenario, rid: str, seed: int | None) -> Any:
        bystander = self._chat(
            workload.single_turn("a bystander question"),
            request_id=f"{rid}-by1",
            max_tokens=4,
            seed=seed,
        )
        assert bystander.ok, bystander.summary()
        affected, _ = super()._drive(scenario_without_bystanders(scenario), rid, seed)
        return affected, [(f"{rid}-by1", bystander)]


def scenario_without_bystanders(scenario: Scenario) -> Scenario:
    from dataclasses import replace

    return replace(scenario, bystanders=0)


def test_a_bystander_that_finished_before_the_fault_is_no_witness(graceful_server):
    runner = _runner(BystanderFirst, graceful_server)
    result = runner.run(BATCHED)
    outcome = result.outcome
    assert not any(i.endswith("-by1") for i in _fired(result)["request_ids"])
    assert outcome.facts.bystanders == ["answered"]
    assert outcome.outcome == "unproven", outcome.reasons
    assert outcome.missing == [
        "bystander 1 in flight when the fault fired (it had finished before the fault "
        "fired, or started after it)"
    ]


class NoMemorySamples(ScenarioRunner):
    """The probe's request_start event (its memory sample) is never found."""

    def _start_event(self, since: int, request_id: str) -> dict:
        return {}


def test_a_cycles_row_without_its_memory_samples_is_unproven(graceful_server):
    scenario = Scenario("resource_limit", "sync", "batched", False, "decode", "cycles")
    runner = _runner(NoMemorySamples, graceful_server, cycles=2)
    result = runner.run(scenario)
    outcome = result.outcome
    assert outcome.outcome == "unproven", outcome.reasons  # not graceful without it
    assert outcome.facts.memory_creep_bytes is None and outcome.facts.needs_memory_creep
    assert len(outcome.missing) == 1 and "active-memory creep" in outcome.missing[0]


class ClientFails(ScenarioRunner):
    """The affected request is sent (the fault fires) but its client thread fails."""

    failure: Any = RuntimeError("the client thread died")

    def _drive(self, scenario: Scenario, rid: str, seed: int | None) -> Any:
        affected, bystanders = super()._drive(scenario, rid, seed)
        assert affected.status == 503  # the server answered; only the client's view is lost
        return self.failure, bystanders


class ClientNeverReturns(ClientFails):
    failure = None


@pytest.mark.parametrize(
    ("cls", "says"),
    [
        (ClientFails, "RuntimeError: the client thread died"),
        (ClientNeverReturns, "the client thread did not return within its bound"),
    ],
)
def test_a_failed_affected_client_is_a_named_unknown_not_a_crash(graceful_server, cls, says):
    runner = _runner(cls, graceful_server)
    result = runner.run(BATCHED)
    outcome = result.outcome
    assert outcome.facts.fired and outcome.facts.status is None
    assert outcome.outcome == "unproven", outcome.reasons
    assert outcome.missing == [f"the affected request's answer (the client failed: {says})"]


@pytest.mark.parametrize(
    ("request_ids", "expected"),
    [
        ([["r-1", "r-1-by1"]], True),  # named: it was served beside the fault
        ([["r-1"]], False),  # every request served was named, and it is not among them
        # a server that keeps the header from mlx-lm's code names only the armed request:
        # the anonymous one may be the bystander (measured on vllm-mlx and rapid-mlx)
        ([["r-1", "anon-7"]], None),
        ([], None),  # no fault event with ids at all
    ],
)
def test_a_bystander_absent_beside_unnamed_requests_is_unknown(request_ids, expected):
    events = [{"event": "fired", "request_ids": ids} for ids in request_ids]
    assert _in_flight(events, "r-1-by1") is expected
