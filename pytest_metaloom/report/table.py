"""The terminal table of outcomes; it reads records and computes nothing new."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MARK = {
    "met": "ok",
    "expected gap": "gap",
    "claimed but not met": "FAIL",
    "not fired": "FAIL",
    "unclaimed but graceful": "ok",
    "unproven": "FAIL",
    "unproven (allowed)": "allowed",
}


def _cell(record: dict[str, Any]) -> str:
    return f"{record['outcome']} ({MARK.get(record['verdict'], '?')})"


def _status(record: dict[str, Any]) -> str:
    facts = record["facts"]
    if not facts.get("alive", True):
        return facts.get("signal") or f"rc {facts.get('returncode')}"
    status = facts.get("status")
    return str(status) if status is not None else "-"


def format_table(records: Iterable[dict[str, Any]]) -> list[str]:
    """One row per scenario; one outcome column per patch set (side by side)."""
    records = list(records)
    if not records:
        return []
    labels = list(dict.fromkeys(r["patch_set"] for r in records))
    by_id: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(record["id"], {})[record["patch_set"]] = record
    id_width = max(len(i) for i in by_id) + 2
    if len(labels) == 1:
        header = f"{'scenario':<{id_width}}{'status':>8} {'health':>7} {'cache':>6}  outcome"
        lines = [header, "-" * len(header)]
        for scenario_id, per_set in by_id.items():
            record = next(iter(per_set.values()))
            facts = record["facts"]
            health = facts.get("health_after_recovery")
            cached = facts.get("cached_tokens_after")
            lines.append(
                f"{scenario_id:<{id_width}}{_status(record):>8} {health if health else '-':>7} "
                f"{cached if cached is not None else '-':>6}  {_cell(record)}"
            )
    else:
        width = max(24, *(len(label) + 2 for label in labels))
        header = f"{'scenario':<{id_width}}" + "".join(f"{label:<{width}}" for label in labels)
        lines = [header, "-" * len(header)]
        for scenario_id, per_set in by_id.items():
            cells = "".join(
                f"{_cell(per_set[label]) if label in per_set else '-':<{width}}" for label in labels
            )
            lines.append(f"{scenario_id:<{id_width}}{cells}")
    lines.append("")
    for label in labels:
        mine = [r for r in records if r["patch_set"] == label]
        counts: dict[str, int] = {}
        for record in mine:
            counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
        summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        failed = sum(1 for r in mine if not r["passed"])
        lines.append(f"{label}: {len(mine)} scenarios: {summary}; {failed} failed expectations")
    return lines
