"""Activation: install the runtime in the process that imports ``mlx_lm.server``.

The bootstrap ``sitecustomize`` calls :func:`check_env` and
:func:`install_when_server_imported`; everything about *when* and *where* the runtime
comes alive lives here, apart from what it does once alive.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import control, patches
from .state import Runtime, parse_limits

SERVER_MODULE = "mlx_lm.server"
RUNTIME: Runtime | None = None


class _HookLoader(importlib.abc.Loader):
    """Runs the real loader, then a patch function on the fresh module."""

    def __init__(self, inner: Any, hook: Callable[[Any], None]) -> None:
        self._inner = inner
        self._hook = hook

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches a module right after it is imported, wherever the import comes from."""

    def __init__(self, hooks: dict[str, Callable[[Any], None]]) -> None:
        self.hooks = hooks
        self._busy: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.hooks or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookLoader(spec.loader, self.hooks[name])
        return spec


def check_env(env: Mapping[str, str] | None = None) -> None:
    """Validate ``METALOOM_FAULTS`` and ``METALOOM_LIMITS`` without importing mlx."""
    from pytest_metaloom.inject.faults import parse_spec

    env = os.environ if env is None else env
    if env.get("METALOOM_FAULTS"):
        parse_spec(env["METALOOM_FAULTS"])
    if env.get("METALOOM_LIMITS"):
        parse_limits(env["METALOOM_LIMITS"])


def install_when_server_imported(env: Mapping[str, str] | None = None) -> None:
    """Install the runtime only in the process that imports ``mlx_lm.server``.

    The environment is inherited by every process in between (a shell wrapper, a
    supervisor such as metaloom-guard): those must stay inert, import no mlx and bind
    no control socket, so the harness always talks to the real server.
    """
    env = dict(os.environ if env is None else env)
    if SERVER_MODULE in sys.modules:
        install(env)
        return
    sys.meta_path.insert(0, PostImportFinder({SERVER_MODULE: lambda m: install(env)}))


def install(env: Mapping[str, str] | None = None) -> Runtime:
    """Install the runtime once; configure it from ``METALOOM_*`` variables."""
    global RUNTIME
    if RUNTIME is not None:
        return RUNTIME
    env = dict(os.environ if env is None else env)
    rt = Runtime(env)
    limits = env.get("METALOOM_LIMITS")
    faults = env.get("METALOOM_FAULTS")
    if limits:
        parse_limits(limits)  # fail now, with the cause, not at the first request
    patches.patch_mlx(rt)
    if SERVER_MODULE in sys.modules:
        patches.patch_server(rt, sys.modules[SERVER_MODULE])
    else:
        sys.meta_path.insert(
            0, PostImportFinder({SERVER_MODULE: lambda m: patches.patch_server(rt, m)})
        )
    RUNTIME = rt
    info: dict[str, Any] = {"mlx_version": rt.mlx_version, "semantics_default": rt.semantics}
    with contextlib.suppress(Exception):
        info["backend"] = str(rt.mx.default_device())
        info["metal"] = bool(rt.mx.metal.is_available())
    rt.emit("started", **info)
    if faults:
        rt.arm(faults, defer_sizes=True)
        if any(not p.resolved for p in rt.points):
            rt.deferred_env.append("faults")
    if limits:
        rt.deferred_env.append("limits")
    if env.get("METALOOM_CONTROL"):
        control.serve(rt, env["METALOOM_CONTROL"])
    return rt
