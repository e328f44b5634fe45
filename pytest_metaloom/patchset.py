"""Patch sets: which changes to mlx-lm a server run is testing, and what they claim to fix.

A patch set is ``stock`` (no change), a single unified diff (``.diff``/``.patch``, paths
relative to the mlx-lm repository root), or a directory with a ``patchset.toml`` manifest
and its diffs. The installed ``mlx_lm`` is never modified: diffs are applied with
``git apply`` to a copy (the *overlay*) that the server finds first on ``PYTHONPATH``.
The claims say which fault scenarios the set promises to handle gracefully, so a report
can tell a broken promise ("claimed but not met") from an expected gap.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .faults import FAULT_KINDS, PATHS, SEMANTICS

STOCK = "stock"
MANIFEST_NAME = "patchset.toml"
DIFF_SUFFIXES = (".diff", ".patch")
OVERLAY_MARKER = ".metaloom-overlay.json"
ALLOW_MISMATCH_OPTION = "--metaloom-allow-version-mismatch"
# Only the package is copied into the overlay; other files an upstream PR touches
# (tests, docs, setup) are skipped and reported.
PACKAGE_DIR = "mlx_lm"

_TOP_KEYS = ("name", "description", "base", "patches", "claims")
_BASE_KEYS = ("mlx_lm", "semantics")
_PATCH_KEYS = ("file", "upstream")
_CLAIM_KEYS = ("faults", "semantics", "paths", "stream")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PatchSetError(ValueError):
    """A patch set is invalid, does not apply, or does not fit the installed mlx-lm."""


class Patch(NamedTuple):
    """One diff of a patch set, in application order."""

    path: Path
    upstream: str | None = None


@dataclass(frozen=True)
class Claims:
    """The scenarios a patch set promises to handle gracefully (a cross product)."""

    faults: frozenset[str] = frozenset()
    semantics: frozenset[str] = frozenset()
    paths: frozenset[str] = frozenset()
    stream: frozenset[bool] = frozenset()

    @classmethod
    def everything(cls) -> Claims:
        return cls(
            frozenset(FAULT_KINDS),
            frozenset(SEMANTICS),
            frozenset(PATHS),
            frozenset({True, False}),
        )

    def covers(self, fault: str, semantics: str, path: str, stream: bool) -> bool:
        return (
            fault in self.faults
            and semantics in self.semantics
            and path in self.paths
            and stream in self.stream
        )

    def describe(self) -> str:
        def show(values: frozenset[Any], universe: Iterable[Any]) -> str:
            universe = list(universe)
            if not values:
                return "none"
            if set(values) == set(universe):
                return "*"
            return ", ".join(str(v).lower() for v in universe if v in values)

        return (
            f"faults {show(self.faults, FAULT_KINDS)}; "
            f"semantics {show(self.semantics, SEMANTICS)}; "
            f"paths {show(self.paths, PATHS)}; "
            f"stream {show(self.stream, (True, False))}"
        )


@dataclass(frozen=True)
class PatchSet:
    """A loaded, validated patch set."""

    name: str
    source: Path | None
    patches: tuple[Patch, ...] = ()
    base: str | None = None
    semantics: frozenset[str] = frozenset({"sync"})
    claims: Claims = field(default_factory=Claims)
    description: str = ""

    @property
    def is_stock(self) -> bool:
        return self.source is None

    @property
    def base_specifier(self) -> SpecifierSet | None:
        return None if self.base is None else _parse_specifier(self.base, self.source)

    def claims_scenario(self, fault: str, semantics: str, path: str, stream: bool) -> bool:
        """Whether this set promises a graceful outcome for the scenario."""
        _check_names("fault", [fault], FAULT_KINDS, "claims_scenario()")
        _check_names("semantics", [semantics], SEMANTICS, "claims_scenario()")
        _check_names("path", [path], PATHS, "claims_scenario()")
        return self.claims.covers(fault, semantics, path, bool(stream))

    def content_hash(self) -> str:
        """Hash of everything that shapes the overlay (manifest and diffs, in order)."""
        digest = hashlib.sha256(self.name.encode())
        if self.source is not None and self.source.is_dir():
            digest.update((self.source / MANIFEST_NAME).read_bytes())
        for patch in self.patches:
            digest.update(patch.path.name.encode() + b"\0" + patch.path.read_bytes())
        return digest.hexdigest()


# ---------------------------------------------------------------------------- loading


def load_patch_set(spec: str | Path) -> PatchSet:
    """Load ``stock``, a single diff file or a patch-set directory."""
    if isinstance(spec, str) and spec.strip() == STOCK:
        return PatchSet(name=STOCK, source=None)
    path = Path(spec).expanduser()
    if path.is_dir():
        manifest = path / MANIFEST_NAME
        if not manifest.is_file():
            raise PatchSetError(
                f"patch set directory {path} has no {MANIFEST_NAME}; add one "
                f"(see docs/reference/patchset.md) or pass a single .diff file"
            )
        return _load_manifest(manifest)
    if path.name == MANIFEST_NAME and path.is_file():
        return _load_manifest(path)
    if path.is_file():
        if path.suffix not in DIFF_SUFFIXES:
            raise PatchSetError(
                f"patch set {path}: expected 'stock', a {'/'.join(DIFF_SUFFIXES)} file "
                f"or a directory with {MANIFEST_NAME}"
            )
        path = path.resolve()
        _check_diff(path, path.stem)
        # Without a manifest, "this patch makes OOM graceful" is read in its strictest form.
        return PatchSet(
            name=path.stem,
            source=path,
            patches=(Patch(path),),
            semantics=frozenset(SEMANTICS),
            claims=Claims.everything(),
        )
    raise PatchSetError(
        f"patch set {spec!r} not found: pass 'stock', a path to a .diff/.patch file, "
        f"or a directory containing {MANIFEST_NAME}"
    )


def _load_manifest(manifest: Path) -> PatchSet:
    manifest = manifest.resolve()
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PatchSetError(f"{manifest}: not valid TOML: {exc}") from None
    _check_keys(manifest, "", data, _TOP_KEYS)

    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PatchSetError(
            f"{manifest}: key 'name' must be a string of letters, digits, '.', '_' or '-' "
            f"(it names the overlay directory), got {name!r}"
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PatchSetError(f"{manifest}: key 'description' must be a string")

    base = _table(manifest, data, "base")
    _check_keys(manifest, "base.", base, _BASE_KEYS)
    base_spec = base.get("mlx_lm")
    if base_spec is not None:
        if not isinstance(base_spec, str):
            raise PatchSetError(f"{manifest}: key 'base.mlx_lm' must be a string like '0.32.2'")
        _parse_specifier(base_spec, manifest)
    semantics = _name_list(manifest, "base.semantics", base.get("semantics", []), SEMANTICS)

    raw_patches = data.get("patches")
    if not isinstance(raw_patches, list) or not raw_patches:
        raise PatchSetError(
            f"{manifest}: needs at least one [[patches]] entry with a 'file' key "
            f"(use the patch set 'stock' for no patches)"
        )
    patches = []
    for index, entry in enumerate(raw_patches):
        where = f"patches[{index}]"
        if not isinstance(entry, dict):
            raise PatchSetError(f"{manifest}: '{where}' must be a table with a 'file' key")
        _check_keys(manifest, f"{where}.", entry, _PATCH_KEYS)
        file_name = entry.get("file")
        if not isinstance(file_name, str) or not file_name:
            raise PatchSetError(f"{manifest}: key '{where}.file' is required (a diff file name)")
        diff = (manifest.parent / file_name).resolve()
        if not diff.is_relative_to(manifest.parent):
            raise PatchSetError(
                f"{manifest}: key '{where}.file' = {file_name!r} points outside the patch set "
                f"directory; keep the diffs next to {MANIFEST_NAME}"
            )
        if not diff.is_file():
            raise PatchSetError(
                f"{manifest}: key '{where}.file': {diff} does not exist; fix the file name "
                f"or add the diff"
            )
        upstream = entry.get("upstream")
        if upstream is not None and not isinstance(upstream, str):
            raise PatchSetError(f"{manifest}: key '{where}.upstream' must be a string")
        _check_diff(diff, name)
        patches.append(Patch(diff, upstream))

    claims = _load_claims(manifest, data)
    return PatchSet(
        name=name,
        source=manifest.parent,
        patches=tuple(patches),
        base=base_spec,
        semantics=frozenset(semantics) | {"sync"},
        claims=claims,
        description=description,
    )


def _load_claims(manifest: Path, data: Mapping[str, Any]) -> Claims:
    """A missing ``[claims]`` claims nothing; a missing key inside it means "*"."""
    if "claims" not in data:
        return Claims()
    table = _table(manifest, data, "claims")
    _check_keys(manifest, "claims.", table, _CLAIM_KEYS)
    faults = _name_list(manifest, "claims.faults", table.get("faults", "*"), FAULT_KINDS)
    semantics = _name_list(manifest, "claims.semantics", table.get("semantics", "*"), SEMANTICS)
    paths = _name_list(manifest, "claims.paths", table.get("paths", "*"), PATHS)
    stream_raw = table.get("stream", "*")
    if stream_raw == "*" or stream_raw == ["*"]:
        stream = {True, False}
    elif isinstance(stream_raw, list) and all(isinstance(v, bool) for v in stream_raw):
        stream = set(stream_raw)
    else:
        raise PatchSetError(
            f"{manifest}: key 'claims.stream' must be a list of true/false or \"*\", "
            f"got {stream_raw!r}"
        )
    return Claims(frozenset(faults), frozenset(semantics), frozenset(paths), frozenset(stream))


def _table(manifest: Path, data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise PatchSetError(f"{manifest}: '{key}' must be a table ([{key}])")
    return value


def _check_keys(manifest: Path, prefix: str, table: Mapping[str, Any], valid: Sequence[str]):
    for key in table:
        if key not in valid:
            raise PatchSetError(
                f"{manifest}: unknown key '{prefix}{key}'; valid keys here: {', '.join(valid)}"
            )


def _name_list(manifest: Path, key: str, value: Any, valid: Iterable[str]) -> set[str]:
    valid = list(valid)
    if value == "*":
        return set(valid)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PatchSetError(
            f"{manifest}: key '{key}' must be a list of names or \"*\"; "
            f"valid names: {', '.join(valid)}"
        )
    if "*" in value:
        return set(valid)
    _check_names(key, value, valid, str(manifest))
    return set(value)


def _check_names(what: str, names: Iterable[str], valid: Iterable[str], where: str) -> None:
    valid = list(valid)
    for name in names:
        if name not in valid:
            raise PatchSetError(
                f"{where}: unknown name {name!r} in '{what}'; valid names: {', '.join(valid)}"
            )


def _parse_specifier(text: str, where: Path | None) -> SpecifierSet:
    try:
        Version(text)
        return SpecifierSet(f"=={text}")
    except InvalidVersion:
        pass
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise PatchSetError(
            f"{where}: key 'base.mlx_lm' = {text!r} is neither a version (0.32.2) nor a "
            f"PEP 440 specifier ('>=0.32,<0.33')"
        ) from None


_DIFF_TARGET_RE = re.compile(r"^\+\+\+ (\S+)", re.MULTILINE)


def _diff_targets(diff: Path) -> list[str]:
    """Target paths of a diff with the ``b/`` prefix stripped (what ``-p1`` resolves)."""
    targets = []
    for raw in _DIFF_TARGET_RE.findall(diff.read_text(encoding="utf-8", errors="replace")):
        if raw == "/dev/null":
            continue
        targets.append(raw.split("/", 1)[1] if "/" in raw else raw)
    return targets


def _check_diff(diff: Path, set_name: str) -> None:
    targets = _diff_targets(diff)
    if not targets:
        raise PatchSetError(
            f"patch set {set_name!r}: {diff} is not a unified diff (no '+++ b/...' line); "
            f"get the PR's .diff (https://github.com/OWNER/REPO/pull/N.diff)"
        )
    if not any(_in_package(t) for t in targets):
        raise PatchSetError(
            f"patch set {set_name!r}: {diff.name} changes no file under {PACKAGE_DIR}/ "
            f"({', '.join(targets)}); paths must be relative to the mlx-lm repository root, "
            f"like a/{PACKAGE_DIR}/server.py"
        )


def _in_package(target: str) -> bool:
    return target.startswith(PACKAGE_DIR + "/")


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
        for target in _diff_targets(patch.path):
            path = root / target
            if not _in_package(target) or path.suffix != ".py" or not path.is_file():
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
        targets = _diff_targets(patch.path)
        applied = [t for t in targets if _in_package(t)]
        skipped = [t for t in targets if not _in_package(t)]
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
