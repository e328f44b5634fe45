"""The pytest face of the OOM matrix: one test item per (patch set, scenario).

Collected only with ``--metal-oom``, from any directory (no test files needed). The
servers, runners and patch-set overlays belong to ``matrix/pool.py``; an item asks the
pool for its target's runner, runs its scenario and turns the result into a pass, a
failure or an expected gap. Each item is bounded by pytest-timeout, with a timeout
derived from the scenario's deadline (``matrix.pool.item_timeout``).
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

import pytest

from pytest_metaloom.config import Settings
from pytest_metaloom.fixtures import SessionState, state_of
from pytest_metaloom.matrix.pool import MatrixSetupError
from pytest_metaloom.report.document import PROPERTY

if TYPE_CHECKING:
    from pytest_metaloom.matrix.pool import MatrixPool, PatchTarget


def _pool(item: pytest.Item) -> MatrixPool:
    pool = state_of(item.config).pool
    if pool is None:
        raise RuntimeError("the metaloom matrix pool is gone: the session already ended")
    return pool


def _settings(item: pytest.Item) -> Settings:
    return state_of(item.config).settings


class ScenarioFailure(Exception):
    def __init__(self, message: str, record: dict[str, Any], context: str) -> None:
        super().__init__(message)
        self.record = record
        self.context = context


class MatrixCollector(pytest.Collector):
    """The session's ``metaloom`` node: its children are the matrix items.

    Collected through pytest's own machinery (``session.genitems``), so the terminal
    counts the items and collect reports reach every plugin as for any test file.
    """

    def __init__(self, *, build: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._build = build

    def collect(self) -> list[pytest.Item]:
        return self._build(self) if self._build is not None else []

    def reportinfo(self) -> tuple[str, int | None, str]:
        return ("metaloom", None, "metaloom OOM matrix")


class ScenarioItem(pytest.Item):
    def __init__(
        self, *, scenario: Any, target: PatchTarget, timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario
        self.target = target
        self.add_marker("metal_oom")
        self.add_marker(pytest.mark.timeout(timeout))

    def reportinfo(self) -> tuple[str, int | None, str]:
        return ("metaloom", None, self.name)

    def setup(self) -> None:
        if _settings(self).metaloom_real_metal:
            from pytest_metaloom.matrix.realmetal import metal_unavailable_reason

            reason = metal_unavailable_reason()
            if reason:
                pytest.skip(reason)

    def runtest(self) -> None:
        try:
            runner = _pool(self).runner(self.target)
        except MatrixSetupError as exc:
            # the report is still written: this scenario's record says why it did not run
            self.user_properties.append((PROPERTY, json.dumps(not_run_record(self, str(exc)))))
            raise
        result = runner.run(self.scenario)
        claimed = self.target.claims(self.scenario)
        outcome = result.outcome.outcome
        record = build_record(self, result, claimed)
        what = "claimed but not met" if self.target.patch_set is not None else "not graceful"
        judge(
            self,
            record,
            _context(result),
            not_fired="the armed fault never fired: this scenario proved nothing",
            unmet=f"{what}: observed {outcome}",
        )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        exc = excinfo.value
        if isinstance(exc, ScenarioFailure):
            record = exc.record
            lines = [
                f"{self.scenario.id} [{self.target.label}]: {exc}",
                *(f"  - {reason}" for reason in record["reasons"]),
                "facts:",
                *(f"  {k} = {v!r}" for k, v in record["facts"].items()),
                f"reproduce: {record['reproduce']}",
                "",
                exc.context,
            ]
            return "\n".join(lines)
        if isinstance(exc, MatrixSetupError):
            return f"{self.target.label}: {exc}"
        return super().repr_failure(excinfo)


def judge(item: Any, record: dict[str, Any], context: str, *, not_fired: str, unmet: str) -> None:
    """Attach the record (JSON report, JUnit properties), then pass, fail or xfail the item."""
    item.user_properties.append((PROPERTY, json.dumps(record)))
    for key in ("outcome", "verdict", "patch_set", "claimed"):
        item.user_properties.append((f"{PROPERTY}_{key}", str(record[key])))
    outcome = record["outcome"]
    if outcome == "not_fired":
        raise ScenarioFailure(not_fired, record, context)
    if outcome == "unproven" and record["claimed"]:
        if record["verdict"] == "unproven (allowed)":
            return
        missing = "; ".join(record.get("missing") or [])
        raise ScenarioFailure(
            f"unproven: no failure seen, but not shown either (missing: {missing}); "
            "pass --metaloom-allow-unproven to accept it",
            record,
            context,
        )
    if record["claimed"] and outcome != "graceful":
        raise ScenarioFailure(unmet, record, context)
    if not record["claimed"] and outcome != "graceful":
        pytest.xfail(f"expected gap (not claimed by {item.target.label}): {outcome}")


def _context(result: Any) -> str:
    events = "\n".join(json.dumps(e) for e in result.events[-12:])
    return f"--- events ---\n{events}\n--- server log tail ---\n{result.log_tail}"


def reproduce_command(item: ScenarioItem) -> str:
    settings = _settings(item)
    argv = ["pytest", "--metal-oom", "-k", item.scenario.id, "--metaloom-full-matrix"]
    if item.target.spec is not None:
        argv += ["--metaloom-patch-set", item.target.spec]
    if settings.metaloom_guard:
        argv.append("--metaloom-guard")
    if settings.metaloom_model:
        argv += ["--metaloom-model", settings.metaloom_model]
    if settings.metaloom_server:
        argv += ["--metaloom-server", settings.metaloom_server]
    argv += ["--metaloom-seed", str(settings.metaloom_seed)]
    return shlex.join(argv)


PASSING = ("met", "expected gap", "unclaimed but graceful", "unproven (allowed)")


def _allow_unproven(item: Any) -> bool:
    return bool(_settings(item).metaloom_allow_unproven)


def _verdict(outcome: str, claimed: bool, allow_unproven: bool) -> str:
    """The verdict word: what the outcome means for what the patch set claims."""
    if outcome == "not_fired":
        return "not fired"
    if outcome == "unproven" and claimed:
        return "unproven (allowed)" if allow_unproven else "unproven"
    if claimed:
        return "met" if outcome == "graceful" else "claimed but not met"
    return "unclaimed but graceful" if outcome == "graceful" else "expected gap"


def scenario_fields(item: ScenarioItem) -> dict[str, Any]:
    """The fields that name a scenario in every record, run or not."""
    scenario = item.scenario
    return {
        "id": scenario.id,
        "nodeid": item.nodeid,
        "patch_set": item.target.label,
        "fault": scenario.fault,
        "semantics": scenario.semantics,
        "path": scenario.path,
        "stream": scenario.stream,
        "site": scenario.site,
        "workload": scenario.workload,
    }


def build_record(item: ScenarioItem, result: Any, claimed: bool) -> dict[str, Any]:
    outcome = result.outcome.outcome
    verdict = _verdict(outcome, claimed, _allow_unproven(item))
    return {
        **scenario_fields(item),
        "outcome": outcome,
        "expected": "graceful" if claimed else "any (not claimed)",
        "claimed": claimed,
        "verdict": verdict,
        "passed": verdict in PASSING,
        "reasons": result.outcome.reasons,
        "missing": result.outcome.missing,
        "facts": result.outcome.facts.to_dict(),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "guard": bool(result.outcome.facts.behind_guard),
        "reproduce": reproduce_command(item),
        **server_fields(item),
    }


def server_fields(item: Any) -> dict[str, Any]:
    """Which server profile ran, and the evidence it cannot give (each with the reason)."""
    profile = _settings(item).profile
    return {"server": profile.name, "unproven_evidence": profile.unproven()}


def not_run_record(item: ScenarioItem, reason: str) -> dict[str, Any]:
    """The report record of a scenario whose server or patch set could not be prepared."""
    scenario = item.scenario
    return {
        **scenario_fields(item),
        "outcome": "not_run",
        "expected": "graceful",
        "claimed": item.target.claims(scenario) if item.target.patch_set is not None else True,
        "verdict": "not run",
        "passed": False,
        "reasons": [reason],
        "facts": {},
        "timings": {},
        "guard": False,
        "reproduce": reproduce_command(item),
    }


def collect_matrix(session: pytest.Session, state: SessionState) -> list[pytest.Item]:
    """The matrix's items; nothing is built or started here (the pool does that on first use)."""
    from pytest_metaloom.matrix.pool import MatrixPool, item_timeout, make_targets
    from pytest_metaloom.matrix.scenarios import build_matrix
    from pytest_metaloom.server.profiles import ProfileError

    settings = state.settings
    try:
        profile = settings.profile
        scenarios = build_matrix(
            faults=settings.metaloom_faults,
            semantics=settings.metaloom_semantics,
            # a server serves only some paths, and sites where its code runs: a scenario
            # elsewhere could never fire
            paths=settings.metaloom_paths or list(profile.paths),
            sites=settings.metaloom_sites or list(profile.sites),
            stream=settings.metaloom_stream,
            full=settings.metaloom_full_matrix,
        )
    except (ValueError, ProfileError) as exc:
        raise pytest.UsageError(f"metaloom: {exc}") from exc
    targets = make_targets(settings)
    if settings.metaloom_model_spec:
        from pytest_metaloom.server.model import ModelError, spec_from_text

        try:
            spec_from_text(settings.metaloom_model_spec)
        except ModelError as exc:
            raise pytest.UsageError(f"metaloom: --metaloom-model-spec: {exc}") from exc
    state.pool = MatrixPool(settings, targets, on_server=state.track)
    timeout = item_timeout(settings)

    def build(collector: MatrixCollector) -> list[pytest.Item]:
        if settings.metaloom_real_metal or settings.metaloom_real_device:
            return collect_real(collector, targets, timeout, device=settings.metaloom_real_device)
        return [
            ScenarioItem.from_parent(
                collector,
                name=f"{scenario.id}[{target.label}]",
                scenario=scenario,
                target=target,
                timeout=timeout,
            )
            for target in targets.values()
            for scenario in scenarios
        ]

    collector = MatrixCollector.from_parent(session, name="metaloom", build=build)
    return list(session.genitems(collector))


# ---------------------------------------------------------------------- real-device mode
# One item per patch set: no simulated fault; memory made scarce for real (Metal: lowered
# limits; CUDA: a headroom helper, realdevice.py) and the tool loop driven until MLX
# fails by itself. Off a GPU every item skips with the reason.

REAL_METAL_ID = "real-metal-tool_loop"
REAL_DEVICE_ID = "real-device-tool_loop"


class RealMetalItem(pytest.Item):
    def __init__(
        self, *, target: PatchTarget, timeout: float, device: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.device = device  # --metaloom-real-device (any GPU) vs --metaloom-real-metal
        self.add_marker("metal_oom")
        self.add_marker(pytest.mark.timeout(timeout))

    def reportinfo(self) -> tuple[str, int | None, str]:
        return ("metaloom", None, self.name)

    def setup(self) -> None:
        from pytest_metaloom.matrix import realdevice, realmetal

        if self.device:
            reason = realdevice.unavailable_reason()
        else:
            reason = realmetal.metal_unavailable_reason()
        if reason:
            pytest.skip(reason)

    def runtest(self) -> None:
        from pytest_metaloom.matrix import backends, realdevice, realmetal

        pool = _pool(self)
        pool.runner(self.target)
        # the squeeze belongs to this session's state: its teardown (also reached on
        # Ctrl-C and on SIGTERM) stops this session's helper and puts back its ceilings
        device = state_of(self.config).device
        if self.device:
            plan, pressure = backends.plan_for(pool.settings, pool.model, device)
            result = realdevice.run_real_device(self.target.server, plan, pressure)
        else:
            result = realmetal.run_real_scenario(
                self.target.server,
                realmetal.plan_for(pool.settings, pool.model),
                ceilings=device.ceilings,
            )
        claimed = self.target.patch_set is None or (
            result.kind is not None
            and self.target.patch_set.claims_scenario(
                result.kind, result.semantics or "sync", "batched", False
            )
        )
        record = build_real_record(self, result, claimed)
        judge(
            self,
            record,
            f"--- server log tail ---\n{result.log_tail}",
            not_fired=(
                "no real failure happened: this run proved nothing (lower the limits or "
                "--metaloom-headroom, add --metaloom-sysctl, raise --metaloom-turn-words, "
                "or use a bigger --metaloom-model-spec)"
            ),
            unmet=f"real failure not handled: observed {result.outcome.outcome}",
        )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        exc = excinfo.value
        if isinstance(exc, ScenarioFailure):
            record = exc.record
            lines = [
                f"{self.name}: {exc}",
                *(f"  - {reason}" for reason in record["reasons"]),
                f"turns (status per turn): {record['turns']}",
                f"limits: {record['limits']}",
                f"reproduce: {record['reproduce']}",
                "",
                exc.context,
            ]
            return "\n".join(lines)
        if isinstance(exc, MatrixSetupError):
            return f"{self.target.label}: {exc}"
        return super().repr_failure(excinfo)


def build_real_record(item: RealMetalItem, result: Any, claimed: bool) -> dict[str, Any]:
    """The report record of a real run, in the same shape as a simulated scenario's."""
    settings = _settings(item)
    outcome = result.outcome.outcome
    verdict = _verdict(outcome, claimed, _allow_unproven(item))
    item_id = REAL_DEVICE_ID if item.device else REAL_METAL_ID
    flag = "--metaloom-real-device" if item.device else "--metaloom-real-metal"
    argv = ["pytest", "--metal-oom", flag, "-k", item_id]
    if item.target.spec is not None:
        argv += ["--metaloom-patch-set", item.target.spec]
    if settings.metaloom_sysctl:
        argv.append("--metaloom-sysctl")
    if settings.metaloom_model:
        argv += ["--metaloom-model", settings.metaloom_model]
    if settings.metaloom_max_turns != Settings().metaloom_max_turns:
        argv += ["--metaloom-max-turns", str(settings.metaloom_max_turns)]
    if item.device:
        for name, value in (
            ("--metaloom-headroom", settings.metaloom_headroom),
            ("--metaloom-headroom-cmd", settings.metaloom_headroom_cmd),
            ("--metaloom-turn-words", settings.metaloom_turn_words),
            ("--metaloom-model-spec", settings.metaloom_model_spec),
        ):
            if value:
                argv += [name, str(value)]
    return {
        "id": item_id,
        "nodeid": item.nodeid,
        "patch_set": item.target.label,
        "fault": result.kind or ("real_device" if item.device else "real_metal"),
        "semantics": result.semantics or "real",
        "path": "batched",
        "stream": False,
        "site": "any",
        "workload": "tool_loop",
        "outcome": outcome,
        "expected": "graceful" if claimed else "any (not claimed)",
        "claimed": claimed,
        "verdict": verdict,
        "passed": verdict in PASSING,
        "reasons": result.outcome.reasons,
        "missing": result.outcome.missing,
        "facts": result.outcome.facts.to_dict(),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "guard": bool(result.outcome.facts.behind_guard),
        "turns": result.turns,
        "limits": result.limits,
        "sysctl_mb": getattr(result.plan, "sysctl_mb", None),
        "pressure": getattr(result, "pressure", {}),
        "error_text": getattr(result, "error_text", None),
        "where": getattr(result, "where", None),
        "real_site": getattr(result, "site", None),
        "reproduce": shlex.join(argv),
    }


def collect_real(
    collector: MatrixCollector, targets: dict[str, PatchTarget], timeout: float, *, device: bool
) -> list[pytest.Item]:
    item_id = REAL_DEVICE_ID if device else REAL_METAL_ID
    return [
        RealMetalItem.from_parent(
            collector, name=f"{item_id}[{t.label}]", target=t, timeout=timeout, device=device
        )
        for t in targets.values()
    ]
