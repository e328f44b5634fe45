"""The matrix's servers: one target per patch set, each with a lazily started server and runner.

The core half of ``--metal-oom`` (``items.py`` is only its pytest face): it loads the
patch sets, builds their overlays, starts and replaces servers, and removes its run
directory at the end. The model and the run directory are made on first use, so
collecting the matrix (``--collect-only``, each xdist worker) builds nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_metaloom.config import Settings

IMPLICIT = "installed"
WORST_CASE_DEADLINES = 12
"""How many request deadlines one scenario can spend at most: two warm-up requests, the
affected request and its bystanders, three recovery requests, and up to eight turns of
the tool loop (the longest workload)."""


class MatrixSetupError(Exception):
    """A patch set or server could not be prepared; every scenario of it errors."""


def model_spec(settings: Settings) -> Any:
    """The built-in model's spec: --metaloom-model-spec, else ``tiny``; real-device mode
    on CUDA takes ``large``, whose KV cache a few GB of headroom cannot outlast."""
    from pytest_metaloom.server.model import spec_from_text

    text = settings.metaloom_model_spec
    if not text:
        text = "tiny"
        if settings.metaloom_real_device:
            from pytest_metaloom.matrix.realdevice import device_backend

            text = "large" if device_backend() == "cuda" else "tiny"
    return spec_from_text(text)


RUNTIME_ERROR = "the server cannot run the metaloom runtime"


def item_timeout(settings: Settings) -> float:
    """Upper bound (seconds) of one matrix item, derived from the scenario's deadline.

    A scenario may first have to (re)start its server (start, ready and stop timeouts),
    then spends at most :data:`WORST_CASE_DEADLINES` request deadlines (in real-Metal
    mode: the tool loop's turns plus the recovery requests). pytest-timeout fails an item
    that outlives it with a stack dump instead of stalling the run.
    """
    floor = settings.profile.start_timeout or 0  # a server profile's slower start
    server = (
        max(settings.metaloom_start_timeout, floor)
        + max(settings.metaloom_ready_timeout, floor)
        + settings.metaloom_stop_timeout
    )
    deadlines = WORST_CASE_DEADLINES
    if settings.metaloom_real_metal or settings.metaloom_real_device:
        deadlines = max(settings.metaloom_max_turns, 1) + 4
    if settings.metaloom_real_device:  # CUDA turns get at least 60 s; a guard restart 60 s
        return float(round(server + (deadlines + 1) * max(settings.metaloom_deadline, 60.0)))
    return float(round(server + deadlines * settings.metaloom_deadline))


def live_test_timeout(settings: Settings) -> float:
    """Default bound of a test that uses the server fixtures, when no timeout is configured:
    the same budget as one matrix item (a server start and a scenario's worth of requests)."""
    return item_timeout(settings)


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


@dataclass
class MatrixPool:
    """Servers and runners of one matrix run, made on first use, removed by :meth:`close`."""

    settings: Settings
    targets: dict[str, PatchTarget] = field(default_factory=dict)
    on_server: Callable[[Any], Any] | None = None
    """Called with every server the pool creates (the session tracks them for cleanup)."""
    _model: Path | None = None
    _model_built: bool = False
    _base_dir: Path | None = None

    @property
    def model(self) -> Path | None:
        """--metaloom-model, or the built-in tiny model (built on first use), or None for a URL."""
        if not self._model_built:
            model = self.settings.model_path
            if model is None and not self.settings.metaloom_url:
                from pytest_metaloom.server.model import build_tiny_model

                model = build_tiny_model(model_spec(self.settings))
            self._model, self._model_built = model, True
        return self._model

    @property
    def base_dir(self) -> Path:
        """This run's directory (overlays, server run dirs); removed by :meth:`close`."""
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="metaloom-matrix-"))
        return self._base_dir

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
            from pytest_metaloom.matrix.bounds import Bounds

            settings = self.settings
            bounds = Bounds(
                floor=settings.metaloom_stall_floor,
                multiplier=settings.metaloom_stall_multiplier,
                cap=settings.metaloom_deadline,
            )
            server = self._new_server(target, bounds)
            server.start()
            external = bool(settings.metaloom_url)
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
                bounds=bounds,
                seed=settings.metaloom_seed,
                ready_timeout=settings.metaloom_ready_timeout,
                make_spare=None if external else (lambda: self._new_server(target, bounds)),
            )
        return target.runner

    def _new_server(self, target: PatchTarget, bounds: Any) -> Any:
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
            # production restart cap; the watchdog's hang timeout scales from the
            # latency measured so far (the client waits a few of them for the guard)
            guard_options={"max_restarts": 10_000, "hang_timeout": round(bounds.guard_hang, 2)},
            url=self.settings.metaloom_url,
            name=f"server-{target.label}",
            start_timeout=max(self.settings.metaloom_start_timeout, profile.start_timeout or 0),
            ready_timeout=max(self.settings.metaloom_ready_timeout, profile.start_timeout or 0),
            stop_timeout=self.settings.metaloom_stop_timeout,
        )
        if self.on_server is not None:
            self.on_server(server)
        return server

    def close(self) -> None:
        """Stop every runner and server, then remove the run directory (whatever fails)."""
        try:
            for target in self.targets.values():
                runner, target.runner = target.runner, None
                if runner is not None:
                    try:
                        runner.close()
                    finally:
                        runner.server.stop()
        finally:
            if self._base_dir is not None:
                shutil.rmtree(self._base_dir, ignore_errors=True)
                self._base_dir = None
