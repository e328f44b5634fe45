"""The pytest entry point (``pytest11``). Kept thin and import-light.

Everything heavy (mlx, mlx_lm, the server, the injector) is imported lazily inside
fixtures and hooks that only run when the user asks for metaloom.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("metaloom", "Metal OOM fault injection for mlx_lm.server")
    group.addoption(
        "--metal-oom",
        action="store_true",
        default=False,
        help="Collect and run the built-in Metal OOM scenario matrix.",
    )
