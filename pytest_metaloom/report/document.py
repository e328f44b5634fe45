"""The JSON report and the records it is made of.

Records are the JSON objects each scenario item attaches to its test report
(``user_properties``), so they reach the controller under pytest-xdist and land in
JUnit XML as properties without extra work.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_metaloom.versions import backend_name, dist_version

#: The user-property name under which each scenario item carries its JSON record.
PROPERTY = "metaloom"


def build_report(records: list[dict[str, Any]], *, seed: int, patch_sets: list[str]) -> dict:
    return {
        "plugin": dist_version("pytest-metaloom"),
        "mlx": dist_version("mlx"),
        "mlx_lm": dist_version("mlx-lm"),
        "platform": {
            "system": platform.system(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "backend": backend_name(),
        "mode": "simulated",
        "seed": seed,
        "patch_sets": patch_sets,
        "scenarios": sorted(records, key=lambda r: (r["patch_set"], r["id"])),
    }


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def records_from_user_properties(properties: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, value in properties:
        if name == PROPERTY:
            out.append(json.loads(value) if isinstance(value, str) else value)
    return out
