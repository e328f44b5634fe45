"""Patch sets: which changes to mlx-lm a server run is testing, and what they claim to fix.

A patch set is ``stock`` (no change), a single unified diff (``.diff``/``.patch``, paths
relative to the mlx-lm repository root), or a directory with a ``patchset.toml`` manifest
and its diffs. The installed ``mlx_lm`` is never modified: diffs are applied with
``git apply`` to a copy (the *overlay*) that the server finds first on ``PYTHONPATH``.
The claims say which fault scenarios the set promises to handle gracefully, so a report
can tell a broken promise ("claimed but not met") from an expected gap.
"""

from __future__ import annotations

import hashlib
import re
import sys
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

from pytest_metaloom.inject.faults import FAULT_KINDS, PATHS, SEMANTICS

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


def diff_targets(diff: Path) -> list[str]:
    """Target paths of a diff with the ``b/`` prefix stripped (what ``-p1`` resolves)."""
    targets = []
    for raw in _DIFF_TARGET_RE.findall(diff.read_text(encoding="utf-8", errors="replace")):
        if raw == "/dev/null":
            continue
        targets.append(raw.split("/", 1)[1] if "/" in raw else raw)
    return targets


def _check_diff(diff: Path, set_name: str) -> None:
    targets = diff_targets(diff)
    if not targets:
        raise PatchSetError(
            f"patch set {set_name!r}: {diff} is not a unified diff (no '+++ b/...' line); "
            f"get the PR's .diff (https://github.com/OWNER/REPO/pull/N.diff)"
        )
    if not any(in_package(t) for t in targets):
        raise PatchSetError(
            f"patch set {set_name!r}: {diff.name} changes no file under {PACKAGE_DIR}/ "
            f"({', '.join(targets)}); paths must be relative to the mlx-lm repository root, "
            f"like a/{PACKAGE_DIR}/server.py"
        )


def in_package(target: str) -> bool:
    return target.startswith(PACKAGE_DIR + "/")
