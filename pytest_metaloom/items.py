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
        server = LiveServer(
            run_dir=run_dir,
            model=self.model,
            command=self.settings.server_command,
            server_args=self.settings.server_args,
            overlay=target.overlay,
            guard=self.settings.metaloom_guard,
            # the matrix kills the worker on purpose, many times a minute: lift the
            # production restart cap, and let the watchdog turn a hang into a restart
            # well within the scenario's hang deadline
            guard_options={"max_restarts": 10_000, "hang_timeout": HANG_DEADLINE / 4},
            url=self.settings.metaloom_url,
            name=f"server-{target.label}",
            start_timeout=self.settings.metaloom_start_timeout,
            ready_timeout=self.settings.metaloom_ready_timeout,
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
        runner = pool.runner(self.target)
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

    try:
        scenarios = build_matrix(
            faults=settings.metaloom_faults,
            semantics=settings.metaloom_semantics,
            paths=settings.metaloom_paths,
            sites=settings.metaloom_sites,
            stream=settings.metaloom_stream,
            full=settings.metaloom_full_matrix,
        )
    except ValueError as exc:
        raise pytest.UsageError(f"metaloom: {exc}") from exc
    targets = make_targets(settings)
    base_dir = Path(tempfile.mkdtemp(prefix="metaloom-matrix-"))
    model = settings.model_path
    if model is None and not settings.metaloom_url:
        from pytest_metaloom.server.model import ModelError, build_tiny_model, spec_from_text

        text = settings.metaloom_model_spec or "tiny"
        if not settings.metaloom_model_spec and settings.metaloom_real_device:
            from pytest_metaloom.matrix import realdevice

            # a few GB of headroom outlast the tiny model's KV cache by far
            text = "large" if realdevice.device_backend() == "cuda" else "tiny"
        try:
            model = build_tiny_model(spec_from_text(text))
        except ModelError as exc:
            raise pytest.UsageError(f"metaloom: --metaloom-model-spec: {exc}") from exc
    session.config._metaloom_pool = MatrixPool(settings, base_dir, model, targets)  # type: ignore[attr-defined]
    collector = MatrixCollector.from_parent(session, name="metaloom")
    if settings.metaloom_real_metal or settings.metaloom_real_device:
        return collect_real(collector, targets, device=settings.metaloom_real_device)
    items: list[pytest.Item] = []
    for target in targets.values():
        for scenario in scenarios:
            name = f"{scenario.id}[{target.label}]"
            items.append(
                ScenarioItem.from_parent(collector, name=name, scenario=scenario, target=target)
            )
    return items


# ---------------------------------------------------------------------- real-device mode
# One item per patch set: no simulated fault; memory made scarce for real (Metal: lowered
# limits; CUDA: a headroom helper, realdevice.py) and the tool loop driven until MLX
# fails by itself. Off a GPU every item skips with the reason.

REAL_METAL_ID = "real-metal-tool_loop"
REAL_DEVICE_ID = "real-device-tool_loop"


class RealMetalItem(pytest.Item):
    def __init__(self, *, target: PatchTarget, device: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.device = device  # --metaloom-real-device (any GPU) vs --metaloom-real-metal
        self.add_marker("metal_oom")

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
        config = self.config
        if not getattr(config, "_metaloom_sysctl_cleanup", False):
            # session teardown (also reached on Ctrl-C and on SIGTERM, which the plugin
            # turns into KeyboardInterrupt) puts back any ceiling still lowered and
            # stops any headroom helper still holding GPU memory
            config.add_cleanup(realdevice.release_everything)
            config._metaloom_sysctl_cleanup = True  # type: ignore[attr-defined]

    def runtest(self) -> None:
        from pytest_metaloom.matrix import realdevice, realmetal

        pool: MatrixPool = self.config._metaloom_pool  # type: ignore[attr-defined]
        pool.runner(self.target)
        if self.device:
            plan, pressure = realdevice.plan_for(pool.settings, pool.model)
            result = realdevice.run_real_device(self.target.server, plan, pressure)
        else:
            result = realmetal.run_real_scenario(
                self.target.server, realmetal.plan_for(pool.settings, pool.model)
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
    settings: Settings = item.config._metaloom_settings  # type: ignore[attr-defined]
    outcome = result.outcome.outcome
    if outcome == "not_fired":
        verdict = "not fired"
    elif claimed:
        verdict = "met" if outcome == "graceful" else "claimed but not met"
    else:
        verdict = "unclaimed but graceful" if outcome == "graceful" else "expected gap"
    item_id = REAL_DEVICE_ID if item.device else REAL_METAL_ID
    flag = "--metaloom-real-device" if item.device else "--metaloom-real-metal"
    argv = ["pytest", "--metal-oom", flag, "-k", item_id]
    if item.target.spec is not None:
        argv += ["--metaloom-patch-set", item.target.spec]
    if settings.metaloom_sysctl:
        argv.append("--metaloom-sysctl")
    if settings.metaloom_model:
        argv += ["--metaloom-model", settings.metaloom_model]
    if item.device:
        for flag, value in (
            ("--metaloom-headroom", settings.metaloom_headroom),
            ("--metaloom-turn-words", settings.metaloom_turn_words),
            ("--metaloom-model-spec", settings.metaloom_model_spec),
        ):
            if value:
                argv += [flag, str(value)]
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
        "passed": verdict in ("met", "expected gap", "unclaimed but graceful"),
        "reasons": result.outcome.reasons,
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
    collector: MatrixCollector, targets: dict[str, PatchTarget], *, device: bool
) -> list[pytest.Item]:
    item_id = REAL_DEVICE_ID if device else REAL_METAL_ID
    return [
        RealMetalItem.from_parent(collector, name=f"{item_id}[{t.label}]", target=t, device=device)
        for t in targets.values()
    ]
