"""In-server fault runtime, installed by the bootstrap ``sitecustomize``.

It wraps MLX's evaluation and synchronisation points, decides when an armed fault fires
and fails the way MLX fails. Never imports pytest. One module per job:

- ``locate``: which mlx-lm call an evaluation comes from (site, path, line);
- ``triggers``: filters, chains and the memory crossing a point waits for;
- ``waits``: which evaluations only wait (allocate nothing), from MLX's graph state;
- ``timing``: how and when each fault kind fails (instead of, after, parked, abort);
- ``native``: the native thread that aborts the process like Metal's handler;
- ``state``: the ``Runtime`` (armed points, parked errors, limits, requests, events);
- ``control``: the control socket;
- ``patches``: the wrappers around ``mlx.core`` and the ``mlx_lm.server`` hooks;
- ``activation``: when and in which process the runtime comes alive.
"""

from __future__ import annotations

from typing import Any

from .activation import check_env, install, install_when_server_imported
from .state import REQUEST_HEADER, Runtime

__all__ = ["REQUEST_HEADER", "Runtime", "check_env", "install", "install_when_server_imported"]


def __getattr__(name: str) -> Any:
    if name == "RUNTIME":  # the live instance, or None before install()
        from . import activation

        return activation.RUNTIME
    raise AttributeError(name)
