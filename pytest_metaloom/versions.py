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
