"""Correct graceful-OOM patches and their one-defect variants (test fixtures).

Two correct patches of different style: ``graceful-oom`` (the reference set: guards the
batch step where MLX evaluates and answers from the handler lazily) and
``graceful-supervised`` (this directory's fixture: one guard around the whole generation
loop, which fails the requests it holds and restarts). Each defect is a small textual
change to the *patched* ``server.py``; the variant's diff is regenerated from it with
git against the installed mlx-lm, so it always applies.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORRECT = {
    "graceful-oom": REPO / "patchsets" / "graceful-oom",
    "graceful-supervised": Path(__file__).resolve().parent
    / "data"
    / "patchsets"
    / "graceful-supervised",
}
HEALTH = (
    "        is_healthy = self.response_generator.is_healthy\n",
    "        is_healthy = self.response_generator.is_healthy and not getattr(\n"
    '            self.response_generator, "_saw_gpu_failure", False\n'
    "        )\n",
)

# patch -> defect -> [(old, new)]: each ``old`` occurs exactly once in the patched file
DEFECTS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "graceful-oom": {
        "oom_500": [
            (
                'return 503, {"message": str(error), "type": "server_overloaded", "code": code}',
                'return 500, {"message": str(error), "type": "server_overloaded", "code": code}',
            )
        ],
        "no_cache_reset": [
            (
                "self.prompt_cache.trim_to(n_sequences=0)",
                "self.prompt_cache.trim_to(n_sequences=len(self.prompt_cache))",
            )
        ],
        "stream_no_done": [
            (
                '            self.wfile.write(f"data: {body}\\n\\n".encode())\n'
                '            self.wfile.write("data: [DONE]\\n\\n".encode())\n',
                '            self.wfile.write(f"data: {body}\\n\\n".encode())\n',
            )
        ],
        "lying_health": [
            (
                "        if code is None:\n            return\n        try:\n",
                "        if code is None:\n            return\n"
                "        self._saw_gpu_failure = True\n        try:\n",
            ),
            HEALTH,
        ],
    },
    "graceful-supervised": {
        "oom_500": [
            (
                'return 503, {"message": str(error), "type": "service_unavailable", "code": kind}',
                'return 500, {"message": str(error), "type": "service_unavailable", "code": kind}',
            )
        ],
        "no_cache_reset": [
            (
                "self.prompt_cache.trim_to(n_sequences=0)",
                "self.prompt_cache.trim_to(n_sequences=len(self.prompt_cache))",
            )
        ],
        "stream_no_done": [
            (
                '                self.wfile.write(f"data: {payload}\\n\\n".encode())\n'
                '                self.wfile.write("data: [DONE]\\n\\n".encode())\n',
                '                self.wfile.write(f"data: {payload}\\n\\n".encode())\n',
            )
        ],
        "lying_health": [
            (
                "        if is_gpu_failure(error):\n            dropped =",
                "        if is_gpu_failure(error):\n            self._saw_gpu_failure = True\n"
                "            dropped =",
            ),
            HEALTH,
        ],
    },
}


@dataclass(frozen=True)
class DefectCase:
    """A defect, the scenario that shows it, and the class the oracle must give."""

    defect: str
    expected: str
    # Scenario(fault, semantics, path, stream, site)
    scenario: tuple[str, str, str, bool, str]


# Each scenario is a default-matrix row, where both correct patches are graceful.
CASES = (
    DefectCase("oom_500", "wrong_status", ("resource_limit", "sync", "batched", False, "cache")),
    DefectCase(
        "no_cache_reset",
        "no_cache_reset",
        ("alloc_too_large", "sync", "sequential", False, "decode"),
    ),
    DefectCase(
        "stream_no_done",
        "request_lost",
        ("unable_to_allocate", "sync", "batched", True, "decode"),
    ),
    DefectCase("lying_health", "wedged", ("cmdbuf_oom", "deferred", "batched", False, "cache")),
)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60
    ).stdout


def build_variant(patch: str, defect: str, dest: Path) -> Path:
    """A patch-set directory: ``patch`` with ``defect`` put in. Returns its path."""
    from pytest_metaloom.patchset.overlay import installed_mlx_lm

    source = CORRECT[patch]
    package, _ = installed_mlx_lm()
    work = dest / f"src-{patch}-{defect}"
    (work / "mlx_lm").mkdir(parents=True)
    shutil.copy(package / "server.py", work / "mlx_lm" / "server.py")
    _git(work, "init", "-q")
    _git(work, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(work, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "stock")
    (diff,) = sorted(source.glob("*.diff"))
    _git(work, "apply", "-p1", str(diff))
    server = work / "mlx_lm" / "server.py"
    text = server.read_text()
    for old, new in DEFECTS[patch][defect]:
        count = text.count(old)
        if count != 1:
            raise AssertionError(f"{patch}/{defect}: {old!r} occurs {count} times, not once")
        text = text.replace(old, new)
    server.write_text(text)
    out = dest / f"{patch}-{defect}"
    out.mkdir()
    (out / "0001-variant.diff").write_text(_git(work, "diff"))
    manifest = (source / "patchset.toml").read_text()
    manifest = manifest.replace(f'name = "{patch}"', f'name = "{patch}-{defect}"', 1)
    manifest = manifest.replace(f'file = "{diff.name}"', 'file = "0001-variant.diff"', 1)
    (out / "patchset.toml").write_text(manifest)
    return out
