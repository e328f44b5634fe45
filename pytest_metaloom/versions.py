"""What is installed: distribution versions and the MLX backend, told without importing mlx.

One home for these facts so the report header and the JSON report say the same thing, and
so reading them stays cheap for the pytest entry module.
"""

from __future__ import annotations

import platform
from importlib import metadata

CUDA_DISTRIBUTIONS = ("mlx-cuda", "mlx-cuda-12", "mlx-cuda-13")


def dist_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def backend_name() -> str:
    """Which MLX backend this machine has: ``metal``, ``cuda`` or ``cpu``."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "metal"
    if any(dist_version(name) for name in CUDA_DISTRIBUTIONS):
        return "cuda"
    return "cpu"


TESTED_MLX_LM = ">=0.31.3,<=0.32.2"
"""The mlx-lm releases the suite's assertions were measured on: 0.31.3 (``tox -e mlx031``)
and 0.32.2 (the pinned test environment, ``constraints/test.txt``). Outside it, verdicts
may rest on server behaviour nobody checked."""


def mlx_lm_window_warning(installed: str | None = None) -> str | None:
    """A warning when the installed mlx-lm is outside :data:`TESTED_MLX_LM`, else None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = installed if installed is not None else dist_version("mlx-lm")
    if not installed:
        return f"mlx-lm is not installed; the tested window is {TESTED_MLX_LM}"
    try:
        inside = Version(installed) in SpecifierSet(TESTED_MLX_LM)
    except InvalidVersion:
        inside = False
    if inside:
        return None
    return (
        f"mlx-lm {installed} is outside the tested window ({TESTED_MLX_LM}); verdicts may "
        "differ from the documented ones (the tested environment: constraints/test.txt)"
    )
