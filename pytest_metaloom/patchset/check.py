"""``metaloom patchset check``: validate a set and apply it to a scratch overlay.

Lets a reviewer see, before any server starts, that a patch set parses, applies to the
installed mlx-lm and claims what its author meant.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on 3.10 only
    pass

from pytest_metaloom.inject.faults import SEMANTICS
from pytest_metaloom.patchset.manifest import (
    PACKAGE_DIR,
    PatchSetError,
    diff_targets,
    in_package,
    load_patch_set,
)
from pytest_metaloom.patchset.overlay import build_overlay, installed_mlx_lm

# ---------------------------------------------------------------------------- checking


def check_patch_set(
    spec: str | Path, *, mlx_lm_version: str | None = None, allow_version_mismatch: bool = False
) -> str:
    """Validate a set and apply it to a scratch overlay; return a human summary."""
    patch_set = load_patch_set(spec)
    package, installed = installed_mlx_lm()
    version = mlx_lm_version or installed
    if patch_set.is_stock:
        return f"patch set stock: no patches, claims nothing (mlx-lm {version})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tempfile.TemporaryDirectory(prefix="metaloom-check-") as scratch:
            build_overlay(
                patch_set,
                Path(scratch),
                mlx_lm_version=mlx_lm_version,
                allow_version_mismatch=allow_version_mismatch,
            )
    lines = [f"patch set {patch_set.name!r} ({patch_set.source}): OK, applies to mlx-lm {version}"]
    if patch_set.description:
        lines.append(f"  {patch_set.description}")
    base = patch_set.base or "any"
    lines.append(
        f"  base: mlx-lm {base}; semantics assumed: "
        + ", ".join(s for s in SEMANTICS if s in patch_set.semantics)
    )
    for patch in patch_set.patches:
        targets = diff_targets(patch.path)
        applied = [t for t in targets if in_package(t)]
        skipped = [t for t in targets if not in_package(t)]
        ref = f" ({patch.upstream})" if patch.upstream else ""
        line = f"  {patch.path.name}{ref}: {', '.join(applied)}"
        if skipped:
            line += f"; skipped outside {PACKAGE_DIR}/: {', '.join(skipped)}"
        lines.append(line)
    lines.append(f"  claims: {patch_set.claims.describe()}")
    lines.extend(f"  warning: {w.message}" for w in caught)
    return "\n".join(lines)


def patchset_check_main(argv: Sequence[str] | None = None) -> int:
    """``metaloom patchset check PATH``: 0 if the set is valid and applies, else 1."""
    parser = argparse.ArgumentParser(
        prog="metaloom patchset check",
        description="Validate a patch set and check that it applies to the installed mlx-lm.",
    )
    parser.add_argument("path", help="'stock', a .diff/.patch file or a patch-set directory")
    parser.add_argument("--mlx-lm-version", help="check against this version instead")
    parser.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="warn instead of failing when the set is for another mlx-lm version",
    )
    args = parser.parse_args(argv)
    try:
        summary = check_patch_set(
            args.path,
            mlx_lm_version=args.mlx_lm_version,
            allow_version_mismatch=args.allow_version_mismatch,
        )
    except PatchSetError as exc:
        print(f"metaloom patchset check: error: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0
