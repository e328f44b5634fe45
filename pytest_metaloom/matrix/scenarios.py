"""The built-in OOM scenario matrix: scenarios as data.

A scenario is data (fault, semantics, path, stream, site, workload); ``build_matrix``
chooses the default or full set and checks the user's filters against the known names.
No pytest here: ``items.py`` turns scenarios into test items.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pytest_metaloom.inject.faults import FAULT_KINDS, PATHS, SITES

STREAM_MODES = ("nostream", "stream")
TRIGGERS = ("memory", "count")
# A memory-caused scenario fires at the affected request's first evaluation at its site
# that takes the allocator's high-water mark (reset when armed) plus what the evaluation
# asks for past what was allocated when armed + 1 KiB: the request's own memory need
# crosses the lowered limit. The fired event's ``crossing`` shows the numbers.
MEMORY_LIMIT = "allocated+1KiB"
# The tool loop grows its conversation until the same counter crosses what was allocated
# when armed + 1 MiB (on the tiny model that is within the first turn or two).
TOOL_LOOP_MEMORY = "allocated+1MiB"
PROBE_PROMPT = "metaloom cache probe: the quick brown fox jumps over the lazy dog again"
# A bystander streams a long answer and the client ends it once it has streamed past the
# fault, so it is in flight when the fault fires however fast the model is (the fault's
# event shows it was); a short one would not be: a new request joins a running batch
# only between mlx-lm's generation time slices (0.5 s in 0.32), which a few tokens never
# outlive. On the sequential path the server serves one request at a time, so no request
# can be in flight beside the affected one: the default matrix sends bystanders on the
# batched path only.
BYSTANDER_TOKENS = 2048


@dataclass(frozen=True)
class Scenario:
    fault: str
    semantics: str
    path: str
    stream: bool
    site: str
    workload: str = "single"
    bystanders: int = 1  # requests sent beside the affected one (batched path)
    trigger: str = "memory"  # "count": the first evaluation at the site, whatever memory

    @property
    def id(self) -> str:
        mode = "stream" if self.stream else "nostream"
        base = f"{self.fault}-{self.semantics}-{self.path}-{mode}-{self.site}"
        return base if self.workload == "single" else f"{base}-{self.workload}"

    @property
    def kind(self) -> Any:
        return FAULT_KINDS[self.fault]

    @property
    def affected_first(self) -> bool:
        """A fault after the affected stream started, with bystanders beside it: the
        affected request streams first (a long answer), the bystanders join once it has,
        and the fault waits for the last of them (``nth_request``): otherwise the
        bystanders' tokens would satisfy ``after_tokens`` before the affected streamed."""
        return (
            self.workload == "single" and self.stream and self.site == "decode"
        ) and self.bystanders > 0

    def spec(self, request_id: str, *, wired: str | None = None) -> str:
        """The fault spec that arms this scenario for one request."""
        # sync command-buffer faults must say so: unqualified, they take the version default
        explicit = self.semantics != "sync" or self.kind.family == "command_buffer"
        args = f"({self.semantics})" if explicit else ""
        filters = [f"path={self.path}"]
        if self.workload == "tool_loop":
            filters.append(f"wired={wired}" if wired else f"memory={TOOL_LOOP_MEMORY}")
        else:
            filters += [f"site={self.site}", f"request={request_id}"]
            if self.stream and self.site == "decode":
                filters.append("after_tokens=2")  # let the stream start first
            if self.affected_first:  # request ordinals count from the arming
                filters.append(f"nth_request={self.bystanders + 1}")
            if self.trigger == "memory":
                filters.append(f"memory={MEMORY_LIMIT}")
        return f"1*{self.fault}{args}@{','.join(filters)}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id}


def _semantics_for(fault: str, allowed: Sequence[str] | None) -> list[str]:
    options = list(FAULT_KINDS[fault].allowed_semantics)
    if FAULT_KINDS[fault].family == "command_buffer" and not allowed:
        options.remove("sync")  # MLX raises these abort-or-deferred; sync only when asked
    return [s for s in options if not allowed or s in allowed]


def build_matrix(
    *,
    faults: Sequence[str] = (),
    semantics: Sequence[str] = (),
    paths: Sequence[str] = (),
    sites: Sequence[str] = (),
    stream: Sequence[str] = (),
    full: bool = False,
    trigger: str = "memory",
) -> list[Scenario]:
    """The default covering matrix, or the full cross product, narrowed by filters.

    The default covers every kind, both semantics, both paths, both stream modes and
    every site at least once, rotating stream mode and site instead of multiplying them.
    Every scenario is memory-caused unless ``trigger="count"`` (fire at the first
    evaluation at the site).
    """
    _check_names("trigger", [trigger], TRIGGERS)
    _check_names("fault kind", faults, FAULT_KINDS)
    _check_names("semantics", semantics, ("abort", "deferred", "sync"))
    _check_names("path", paths, PATHS)
    _check_names("site", sites, SITES)
    _check_names("stream mode", stream, STREAM_MODES)
    kinds = [k for k in FAULT_KINDS if not faults or k in faults]
    use_paths = [p for p in PATHS if not paths or p in paths]
    use_sites = [s for s in SITES if not sites or s in sites]
    use_stream = [m == "stream" for m in STREAM_MODES if not stream or m in stream]
    scenarios: list[Scenario] = []
    rotation = itertools.count()
    for fault in kinds:
        for sem in _semantics_for(fault, semantics):
            for path in use_paths:
                if full:
                    picks = list(itertools.product(use_stream, use_sites))
                else:
                    if fault == "hang" and path != use_paths[0]:
                        next(rotation)
                        continue  # one hang scenario is enough: each costs a deadline
                    n = next(rotation)
                    site = "decode" if fault == "hang" else use_sites[n % len(use_sites)]
                    picks = [(use_stream[(n // len(use_sites)) % len(use_stream)], site)]
                scenarios.extend(
                    Scenario(
                        fault,
                        sem,
                        path,
                        is_stream,
                        site,
                        bystanders=_bystanders(path),
                        trigger=trigger,
                    )
                    for is_stream, site in picks
                )
    if (not faults or "resource_limit" in faults) and "batched" in use_paths:
        if not semantics or "sync" in semantics:
            scenarios.append(
                Scenario(
                    "resource_limit", "sync", "batched", False, "decode", "cycles", trigger=trigger
                )
            )
    if (not faults or "cmdbuf_oom" in faults) and "batched" in use_paths:
        for sem in _semantics_for("cmdbuf_oom", semantics):
            scenarios.append(
                Scenario("cmdbuf_oom", sem, "batched", False, "decode", "tool_loop", 0)
            )
    return scenarios


def _bystanders(path: str) -> int:
    """One bystander where requests share the batch; none where they never overlap."""
    return 1 if path == "batched" else 0


def _check_names(what: str, given: Sequence[str], valid: Any) -> None:
    import difflib

    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {what} {name!r}{hint} (valid: {', '.join(valid)})")
