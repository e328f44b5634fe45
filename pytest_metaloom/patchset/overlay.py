"""Overlays: the installed ``mlx_lm`` copied aside and patched with ``git apply``.

The installed package is never modified; the server finds the overlay first on
``PYTHONPATH``. A diff that does not apply is reported with the file, line and hunk, and a
set made for another mlx-lm version is refused unless the user allows the mismatch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on 3.10 only
    pass

from pytest_metaloom.patchset.manifest import (
    ALLOW_MISMATCH_OPTION,
    OVERLAY_MARKER,
    PACKAGE_DIR,
    Patch,
    PatchSet,
    PatchSetError,
    diff_targets,
    in_package,
)

# ---------------------------------------------------------------------------- overlays


def installed_mlx_lm() -> tuple[Path, str]:
    """Directory and version of the ``mlx_lm`` package this interpreter imports."""
    spec = importlib.util.find_spec(PACKAGE_DIR)
    if spec is None or not spec.submodule_search_locations:
        raise PatchSetError("mlx-lm is not installed here; install it with pip install mlx-lm")
    package = Path(next(iter(spec.submodule_search_locations)))
    try:
        version = importlib.metadata.version("mlx-lm")
    except importlib.metadata.PackageNotFoundError:
        match = re.search(r"['\"]([^'\"]+)['\"]", (package / "_version.py").read_text())
        if match is None:
            raise PatchSetError(f"cannot tell the mlx-lm version of {package}") from None
        version = match.group(1)
    return package, version


def check_base_version(
    patch_set: PatchSet, version: str, *, allow_version_mismatch: bool = False
) -> bool:
    """True if ``version`` fits the set's base; raises (or warns, if allowed) otherwise."""
    specifier = patch_set.base_specifier
    if specifier is None or specifier.contains(version, prereleases=True):
        return True
    message = (
        f"patch set {patch_set.name} is for mlx-lm {patch_set.base}, installed is {version}; "
        f"install the matching mlx-lm or pass {ALLOW_MISMATCH_OPTION}"
    )
    if not allow_version_mismatch:
        raise PatchSetError(message)
    warnings.warn(message, stacklevel=3)
    return False


def build_overlay(
    patch_set: PatchSet,
    dest_dir: Path,
    *,
    mlx_lm_version: str | None = None,
    allow_version_mismatch: bool = False,
) -> Path | None:
    """Copy the installed ``mlx_lm`` and apply the set's diffs; return the PYTHONPATH entry.

    The overlay lives in ``dest_dir/<name>-<key>`` where the key hashes the set's content
    and the mlx-lm version, so a second call (or another xdist worker) reuses it. It is
    built in a private temporary directory and renamed into place, so concurrent builders
    never see a half-patched tree. ``mlx_lm_version`` overrides the detected version.
    """
    if patch_set.is_stock:
        return None
    package, installed = installed_mlx_lm()
    version = mlx_lm_version or installed
    check_base_version(patch_set, version, allow_version_mismatch=allow_version_mismatch)

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    key_text = f"{patch_set.content_hash()}\0{version}\0{package}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    final = dest_dir / f"{patch_set.name}-{key}"
    if (final / OVERLAY_MARKER).is_file():
        return final

    scratch = Path(tempfile.mkdtemp(prefix=f".{patch_set.name}-", dir=dest_dir))
    try:
        shutil.copytree(
            package, scratch / PACKAGE_DIR, ignore=shutil.ignore_patterns("__pycache__")
        )
        for patch in patch_set.patches:
            _git_apply(patch_set, patch, scratch, version)
        _compile_touched(patch_set, scratch)
        marker = {"patch_set": patch_set.name, "mlx_lm": version, "source": str(package)}
        (scratch / OVERLAY_MARKER).write_text(json.dumps(marker))
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / OVERLAY_MARKER).is_file():
                raise
            # Another worker won the race with an identical overlay: use theirs.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _git_apply(patch_set: PatchSet, patch: Patch, root: Path, version: str) -> None:
    """Check then apply one diff under ``root`` with git (never a hand-written patcher)."""
    git = shutil.which("git")
    if git is None:
        raise PatchSetError("git is needed to apply patch sets; install git")
    env = dict(os.environ)
    # Never let git discover an enclosing repository: it would resolve paths against it.
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    base_cmd = [git, "apply", "-p1", f"--include={PACKAGE_DIR}/*"]
    for extra in (["--check"], []):
        try:
            result = subprocess.run(
                [*base_cmd, *extra, str(patch.path)],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            raise PatchSetError(
                f"patch set {patch_set.name!r}: git apply of {patch.path.name} timed out"
            ) from None
        if result.returncode != 0:
            raise PatchSetError(_apply_error(patch_set, patch, result.stderr, version))


_FAILED_AT_RE = re.compile(r"patch failed: (\S+):(\d+)")
_MISSING_RE = re.compile(r"error: (\S+): (No such file or directory|does not exist in index)")


def _apply_error(patch_set: PatchSet, patch: Patch, stderr: str, version: str) -> str:
    """One line naming the set, the diff, the target file and the failing hunk."""
    head = f"patch set {patch_set.name!r}: {patch.path.name} does not apply to mlx-lm {version}"
    fix = "rebase the diff on this mlx-lm or install the version it was written for"
    failed = _FAILED_AT_RE.search(stderr)
    if failed:
        target, line = failed.group(1), int(failed.group(2))
        hunk = _find_hunk(patch.path, target, line)
        return f"{head}: {target} hunk {hunk} (line {line}) does not match; {fix}"
    missing = _MISSING_RE.search(stderr)
    if missing:
        return f"{head}: {missing.group(1)} is not in the installed package; {fix}"
    first = next((ln for ln in stderr.splitlines() if ln.strip()), "git apply failed")
    return f"{head}: {first.strip()}; {fix}"


_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@.*$")


def _find_hunk(diff: Path, target: str, line: int) -> str:
    """The ``@@ ... @@`` header of the hunk of ``target`` that git reported at ``line``."""
    current = None
    best: tuple[int, str] | None = None
    for text in diff.read_text(encoding="utf-8", errors="replace").splitlines():
        if text.startswith("+++ "):
            raw = text[4:].split("\t")[0].strip()
            current = raw.split("/", 1)[1] if "/" in raw else raw
            continue
        match = _HUNK_RE.match(text)
        if match and current == target:
            distance = abs(int(match.group(1)) - line)
            if best is None or distance < best[0]:
                best = (distance, text.strip())
    return f"'{best[1]}'" if best else "(hunk not found in the diff)"


def _compile_touched(patch_set: PatchSet, root: Path) -> None:
    """Fail early, with file and line, if a patched module is no longer valid Python."""
    for patch in patch_set.patches:
        for target in diff_targets(patch.path):
            path = root / target
            if not in_package(target) or path.suffix != ".py" or not path.is_file():
                continue
            try:
                compile(path.read_text(encoding="utf-8"), str(path), "exec")
            except SyntaxError as exc:
                raise PatchSetError(
                    f"patch set {patch_set.name!r}: {patch.path.name} leaves {target} with a "
                    f"syntax error at line {exc.lineno}: {exc.msg}; fix the diff"
                ) from None


def server_env(overlay_dir: Path | None, base_env: Mapping[str, str] | None = None) -> dict:
    """``PYTHONPATH`` with the overlay first, keeping ``base_env``'s entries after it.

    Merge the result into the server's environment. ``None`` (stock) adds nothing.
    """
    if overlay_dir is None:
        return {}
    env = os.environ if base_env is None else base_env
    rest = env.get("PYTHONPATH", "")
    value = str(overlay_dir) + (os.pathsep + rest if rest else "")
    return {"PYTHONPATH": value}
