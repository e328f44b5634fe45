"""The pytest face of the OOM matrix: one test item per (patch set, scenario).

Collected only with ``--metal-oom``, from any directory (no test files needed).
Scenarios of one patch set share one server (started lazily, restarted by the runner
whenever a scenario left it dead, wedged or dirty).
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_metaloom.config import Settings
from pytest_metaloom.report.document import PROPERTY

HANG_DEADLINE = 4.0  # seconds a `hang` scenario waits for any answer
IMPLICIT = "installed"


@dataclass
class PatchTarget:
    """What one column of the comparison runs against."""

    label: str
    spec: str | None  # None: the installed mlx-lm, held to every claim
    patch_set: Any = None
    overlay: Path | None = None
    runner: Any = None
    error: str | None = None
    error_told: bool = False  # a server-start error is shown in full once, then referred to

    @property
    def server(self) -> Any:
        """The live server of this target (the runner swaps in a spare after a crash)."""
        return self.runner.server if self.runner is not None else None

    def claims(self, scenario: Any) -> bool:
        if self.patch_set is None:
            return True
        return self.patch_set.claims_scenario(
            scenario.fault, scenario.semantics, scenario.path, scenario.stream
        )


@dataclass
class MatrixPool:
    settings: Settings
    base_dir: Path
    model: Path | None
    targets: dict[str, PatchTarget] = field(default_factory=dict)

    def runner(self, target: PatchTarget) -> Any:
        if target.error:
            if target.error_told:
                first = target.error.split(":")[0]
                raise MatrixSetupError(
                    f"not run: {first} (the cause and the fix are given "
                    f"once, on the first scenario of {target.label})"
                )
            target.error_told = target.error.startswith(RUNTIME_ERROR)
            raise MatrixSetupError(target.error)
        if target.runner is None:
            from pytest_metaloom.matrix.runner import ScenarioRunner
            from pytest_metaloom.patchset.manifest import PatchSetError
            from pytest_metaloom.patchset.overlay import build_overlay

            if target.patch_set is not None and target.overlay is None:
                try:
                    target.overlay = build_overlay(
                        target.patch_set,
                        self.base_dir / "overlays",
                        allow_version_mismatch=self.settings.metaloom_allow_version_mismatch,
                    )
                except PatchSetError as exc:
                    target.error = str(exc)  # every scenario of this set reports it once
                    raise MatrixSetupError(target.error) from None
            server = self._new_server(target)
            server.start()
            external = bool(self.settings.metaloom_url)
            if not external:
                from pytest_metaloom.inject.injector import RuntimeNotStarted

                try:
                    server.require_runtime()
                except RuntimeNotStarted as exc:
                    server.stop()
                    target.error = f"{RUNTIME_ERROR}: {exc}"
                    target.error_told = True
                    raise MatrixSetupError(target.error) from None
            target.runner = ScenarioRunner(
                server,
                hang_deadline=HANG_DEADLINE,
                deadline=self.settings.metaloom_deadline,
                seed=self.settings.metaloom_seed,
                make_spare=None if external else (lambda: self._new_server(target)),
            )
        return target.runner

    def _new_server(self, target: PatchTarget) -> Any:
        from pytest_metaloom.fixtures import _STARTED
        from pytest_metaloom.server.live import LiveServer

        run_dir = Path(tempfile.mkdtemp(prefix=f"{target.label}-", dir=self.base_dir))
        profile = self.settings.profile
        server = LiveServer(
            run_dir=run_dir,
            model=self.model,
            command=self.settings.server_command,
            server_args=self.settings.server_args,
            env=profile.server_env(),
            request_fields=profile.request_fields(self.model),
            overlay=target.overlay,
            guard=self.settings.metaloom_guard,
            # the matrix kills the worker on purpose, many times a minute: lift the
            # production restart cap, and let the watchdog turn a hang into a restart
            # well within the scenario's hang deadline
            guard_options={"max_restarts": 10_000, "hang_timeout": HANG_DEADLINE / 4},
            url=self.settings.metaloom_url,
            name=f"server-{target.label}",
            start_timeout=max(self.settings.metaloom_start_timeout, profile.start_timeout or 0),
            ready_timeout=max(self.settings.metaloom_ready_timeout, profile.start_timeout or 0),
            stop_timeout=self.settings.metaloom_stop_timeout,
        )
        _STARTED.add(server)
        return server

    def close(self) -> None:
        for target in self.targets.values():
            if target.runner is not None:
                target.runner.close()
                target.runner.server.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)


class MatrixSetupError(Exception):
    """A patch set or server could not be prepared; every scenario of it errors."""


RUNTIME_ERROR = "the server cannot run the metaloom runtime"


class ScenarioFailure(Exception):
    def __init__(self, message: str, record: dict[str, Any], context: str) -> None:
        super().__init__(message)
        self.record = record
        self.context = context


class MatrixCollector(pytest.Collector):
    def collect(self) -> list[pytest.Item]:
        return []

    def reportinfo(self) -> tuple[str, int | None, str]:
        return ("metaloom", None, "metaloom OOM matrix")


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario: Any, target: PatchTarget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario
        self.target = target
        self.add_marker("metal_oom")

    def reportinfo(self) -> tuple[str, int | None, str]:
        return ("metaloom", None, self.name)

    def setup(self) -> None:
        settings: Settings = self.config._metaloom_settings  # type: ignore[attr-defined]
        if settings.metaloom_real_metal:
            from pytest_metaloom.matrix.realmetal import metal_unavailable_reason

            reason = metal_unavailable_reason()
            if reason:
                pytest.skip(reason)

    def runtest(self) -> None:
        pool: MatrixPool = self.config._metaloom_pool  # type: ignore[attr-defined]
        try:
            runner = pool.runner(self.target)
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
    if record["claimed"] and outcome != "graceful":
        raise ScenarioFailure(unmet, record, context)
    if not record["claimed"] and outcome != "graceful":
        pytest.xfail(f"expected gap (not claimed by {item.target.label}): {outcome}")


def _context(result: Any) -> str:
    events = "\n".join(json.dumps(e) for e in result.events[-12:])
    return f"--- events ---\n{events}\n--- server log tail ---\n{result.log_tail}"


def reproduce_command(item: ScenarioItem) -> str:
    settings: Settings = item.config._metaloom_settings  # type: ignore[attr-defined]
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


def build_record(item: ScenarioItem, result: Any, claimed: bool) -> dict[str, Any]:
    scenario = item.scenario
    outcome = result.outcome.outcome
    if outcome == "not_fired":
        verdict = "not fired"
    elif claimed:
        verdict = "met" if outcome == "graceful" else "claimed but not met"
    else:
        verdict = "unclaimed but graceful" if outcome == "graceful" else "expected gap"
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
        "outcome": outcome,
        "expected": "graceful" if claimed else "any (not claimed)",
        "claimed": claimed,
        "verdict": verdict,
        "passed": verdict in ("met", "expected gap", "unclaimed but graceful"),
        "reasons": result.outcome.reasons,
        "facts": result.outcome.facts.to_dict(),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "guard": bool(result.outcome.facts.behind_guard),
        "reproduce": reproduce_command(item),
        **server_fields(item),
    }


def server_fields(item: Any) -> dict[str, Any]:
    """Which server profile ran, and the evidence it cannot give (each with the reason)."""
    profile = item.config._metaloom_settings.profile
    return {"server": profile.name, "unproven_evidence": profile.unproven()}


def not_run_record(item: ScenarioItem, reason: str) -> dict[str, Any]:
    """The report record of a scenario whose server or patch set could not be prepared."""
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


def make_targets(settings: Settings) -> dict[str, PatchTarget]:
    """One target per --metaloom-patch-set (or the installed mlx-lm when none is given)."""
    specs = settings.metaloom_patch_set
    if not specs:
        return {IMPLICIT: PatchTarget(IMPLICIT, None)}
    from pytest_metaloom.patchset.manifest import PatchSetError, load_patch_set

    targets: dict[str, PatchTarget] = {}
    for spec in specs:
        try:
            patch_set = load_patch_set(spec)
            label = patch_set.name
        except PatchSetError as exc:
            label = Path(spec).stem or spec
            targets[label] = PatchTarget(label, spec, error=str(exc))
            continue
        while label in targets:
            label += "'"
        targets[label] = PatchTarget(label, spec, patch_set=patch_set)
    return targets


def collect_matrix(session: pytest.Session, settings: Settings) -> list[pytest.Item]:
    from pytest_metaloom.matrix.scenarios import build_matrix
    from pytest_metaloom.server.profiles import ProfileError

    try:
        profile = settings.profile
        scenarios = build_matrix(
            faults=settings.metaloom_faults,
            semantics=settings.metaloom_semantics,
            # a server serves only some paths: a scenario on another could never fire
            paths=settings.metaloom_paths or list(profile.paths),
            sites=settings.metaloom_sites or list(profile.sites),
            stream=settings.metaloom_stream,
            full=settings.metaloom_full_matrix,
        )
    except (ValueError, ProfileError) as exc:
        raise pytest.UsageError(f"metaloom: {exc}") from exc
    targets = make_targets(settings)
    base_dir = Path(tempfile.mkdtemp(prefix="metaloom-matrix-"))
    model = settings.model_path
    if model is None and not settings.metaloom_url:
        from pytest_metaloom.server.model import ModelSpec, build_tiny_model

        model = build_tiny_model(ModelSpec())
    session.config._metaloom_pool = MatrixPool(settings, base_dir, model, targets)  # type: ignore[attr-defined]
    collector = MatrixCollector.from_parent(session, name="metaloom")
    if settings.metaloom_real_metal:
        return collect_real_metal(collector, targets)
    items: list[pytest.Item] = []
    for target in targets.values():
        for scenario in scenarios:
            name = f"{scenario.id}[{target.label}]"
            items.append(
                ScenarioItem.from_parent(collector, name=name, scenario=scenario, target=target)
            )
    return items


# ---------------------------------------------------------------------- real Metal mode
# One item per patch set: no simulated fault, the real limits lowered and the tool loop
# driven until MLX fails by itself (realmetal.py). Off Apple Silicon every item skips.

REAL_METAL_ID = "real-metal-tool_loop"


class RealMetalItem(pytest.Item):
    def __init__(self, *, target: PatchTarget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.add_marker("metal_oom")

    def reportinfo(self) -> tuple[str, int | None, str]:
        return ("metaloom", None, self.name)

    def setup(self) -> None:
        from pytest_metaloom.matrix import realmetal

        reason = realmetal.metal_unavailable_reason()
        if reason:
            pytest.skip(reason)
        config = self.config
        if not getattr(config, "_metaloom_sysctl_cleanup", False):
            # session teardown (also reached on Ctrl-C and on SIGTERM, which the plugin
            # turns into KeyboardInterrupt) puts back any ceiling still lowered
            config.add_cleanup(realmetal.restore_all)
            config._metaloom_sysctl_cleanup = True  # type: ignore[attr-defined]

    def runtest(self) -> None:
        from pytest_metaloom.matrix import realmetal

        pool: MatrixPool = self.config._metaloom_pool  # type: ignore[attr-defined]
        pool.runner(self.target)
        plan = realmetal.plan_for(pool.settings, pool.model)
        result = realmetal.run_real_scenario(self.target.server, plan)
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
                "no real failure happened: this run proved nothing (lower the limits, add "
                "--metaloom-sysctl, or use a bigger --metaloom-model)"
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
    settings: Settings = item.config._metaloom_settings  # type: ignore[attr-defined]
    outcome = result.outcome.outcome
    if outcome == "not_fired":
        verdict = "not fired"
    elif claimed:
        verdict = "met" if outcome == "graceful" else "claimed but not met"
    else:
        verdict = "unclaimed but graceful" if outcome == "graceful" else "expected gap"
    argv = ["pytest", "--metal-oom", "--metaloom-real-metal", "-k", REAL_METAL_ID]
    if item.target.spec is not None:
        argv += ["--metaloom-patch-set", item.target.spec]
    if settings.metaloom_sysctl:
        argv.append("--metaloom-sysctl")
    if settings.metaloom_model:
        argv += ["--metaloom-model", settings.metaloom_model]
    return {
        "id": REAL_METAL_ID,
        "nodeid": item.nodeid,
        "patch_set": item.target.label,
        "fault": result.kind or "real_metal",
        "semantics": result.semantics or "real",
        "path": "batched",
        "stream": False,
        "site": "any",
        "workload": "tool_loop",
        "outcome": outcome,
        "expected": "graceful" if claimed else "any (not claimed)",
        "claimed": claimed,
        "verdict": verdict,
        "passed": verdict in ("met", "expected gap", "unclaimed but graceful"),
        "reasons": result.outcome.reasons,
        "facts": result.outcome.facts.to_dict(),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "guard": bool(result.outcome.facts.behind_guard),
        "turns": result.turns,
        "limits": result.limits,
        "sysctl_mb": result.plan.sysctl_mb,
        "reproduce": shlex.join(argv),
    }


def collect_real_metal(
    collector: MatrixCollector, targets: dict[str, PatchTarget]
) -> list[pytest.Item]:
    return [
        RealMetalItem.from_parent(collector, name=f"{REAL_METAL_ID}[{t.label}]", target=t)
        for t in targets.values()
    ]
