"""When an armed point fires: its filters, its chain, and the memory crossing it waits for.

A ``memory=`` or ``wired=`` filter makes a point memory-caused: it fires at the first
matching evaluation where a real MLX counter, plus the bytes that evaluation is about to
materialise, goes over the limit (lowered, relative to the usage measured when armed).
``memory`` compares the allocator's high-water mark since arming
(``mx.get_peak_memory()``, reset when armed); ``wired`` the active + cached buffers.
The crossing is what the ``fired`` event shows. Call counts (``nth_eval``...) remain
available as explicit filters.

An allocator fault that comes due at a wait-only point (``waits``: nothing to allocate)
is held: the point's counts and chain are rolled back to before that evaluation, so it
fires at the next matching evaluation that allocates. For an allocator fault, the
evaluations counted (``nth_eval``, ``after_evals``) are the ones that allocate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pytest_metaloom.inject import faults as F

from . import waits
from .locate import Location, locate


class Runtime(Protocol):
    """What a trigger reads of the runtime (``state.Runtime``; no import: it imports us)."""

    mx: Any
    active: dict[str, int]
    requests_started: int
    tokens: int

    def memory(self) -> dict[str, int]: ...


def requested_bytes(mx: Any, tree: Any, limit: int = 4096) -> int:
    """Bytes of the arrays an evaluation was asked for (shapes are known before evaluation)."""
    total = 0
    stack = [tree]
    seen = 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, mx.array):
            total += int(item.nbytes)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return total


class Ctx:
    """Facts about one evaluation, computed lazily (a stack walk and counters cost)."""

    def __init__(self, rt: Runtime, frame: Any, op: str, args: Any) -> None:
        self.rt = rt
        self.frame = frame
        self.op = op
        self.args = args
        self._location: Location | None = None
        self._memory: dict[str, int] | None = None
        self._requested: int | None = None
        self._wait_only: bool | None = None

    @property
    def location(self) -> Location:
        if self._location is None:
            self._location = locate(self.frame)
        return self._location

    def site(self) -> str:
        return self.location.site

    def path(self) -> str | None:
        return self.location.path

    def memory(self) -> dict[str, int]:
        if self._memory is None:
            self._memory = self.rt.memory()
        return self._memory

    def requested(self) -> int:
        if self._requested is None:
            self._requested = requested_bytes(self.rt.mx, self.args)
        return self._requested

    def wait_only(self) -> bool:
        """Whether this evaluation only waits: all its arrays already have buffers."""
        if self._wait_only is None:
            self._wait_only = waits.only_waits(self.rt.mx, self.args)
        return self._wait_only

    def counter(self, key: str) -> tuple[str, int]:
        """The counter a ``memory``/``wired`` limit is compared with, and its value."""
        mem = self.memory()
        if key == "wired":  # the residency set holds cached buffers too
            return "active+cache+requested", mem["active"] + mem["cache"] + self.requested()
        # The allocator's high-water mark since arming (the peak is reset then), so memory
        # freed meanwhile (a prompt-cache eviction) cannot hide the pressure.
        return "peak+requested", max(mem["peak"], mem["active"]) + self.requested()


class Point:
    """One armed point: chain state, filters, resolved limits, and what it crossed."""

    def __init__(self, index: int, point: F.FaultPoint, rt: Runtime) -> None:
        self.index = index
        self.point = point
        self.chain = F.ChainState(point)
        self.sites = set(point.sites) if point.sites else None
        self.path = point.get("path")
        self.request = point.get("request")
        self.nth_eval = point.int_filter("nth_eval")
        self.after_evals = point.int_filter("after_evals")
        self.nth_request = point.int_filter("nth_request")
        self.after_requests = point.int_filter("after_requests")
        self.after_tokens = point.int_filter("after_tokens")
        self.limits: dict[str, int] = {}
        self.resolved = not (point.get("wired") or point.get("memory"))
        self.request_base = rt.requests_started
        self.token_base = rt.tokens
        self.evals = 0
        self.crossing: dict[str, Any] | None = None
        self.held = 0  # wait-only evaluations an allocator fault was held over
        self.held_where: str | None = None  # the first of them

    @property
    def wired(self) -> int | None:
        return self.limits.get("wired")

    @property
    def memory(self) -> int | None:
        return self.limits.get("memory")

    def resolve(self, baselines: Mapping[str, int]) -> dict[str, int]:
        for key in ("wired", "memory"):
            text = self.point.get(key)
            if text is not None:
                self.limits[key] = F.parse_size(text, baselines)
        self.resolved = True
        return dict(self.limits)

    def _requests_match(self, rt: Runtime) -> bool:
        if self.request is not None and self.request not in rt.active:
            return False
        if self.nth_request is not None or self.after_requests is not None:
            ords = [o - self.request_base for o in rt.active.values()]
            if self.nth_request is not None and self.nth_request not in ords:
                return False
            if self.after_requests is not None and not any(o > self.after_requests for o in ords):
                return False
        return not (
            self.after_tokens is not None and rt.tokens - self.token_base <= self.after_tokens
        )

    def _crossed(self, ctx: Ctx) -> dict[str, Any] | None:
        """The first limit this evaluation goes over, or None (no limit: trivially crossed)."""
        if not self.limits:
            return {}
        for key, limit in self.limits.items():
            counter, value = ctx.counter(key)
            if value > limit:
                return {
                    "limit": key,
                    "limit_bytes": limit,
                    "counter": counter,
                    "value": value,
                    "over_by": value - limit,
                    "requested": ctx.requested(),
                    "memory": ctx.memory(),
                }
        return None

    def save(self) -> tuple[Any, ...]:
        """Counts, crossing and chain state before an evaluation, for ``hold``."""
        return (self.evals, self.crossing, self.chain.checkpoint())

    def hold(self, saved: tuple[Any, ...], ctx: Ctx) -> None:
        """Undo this evaluation's hit: the fault stays armed for one that allocates."""
        self.evals, self.crossing, chain = saved
        self.chain.rollback(chain)
        self.held += 1
        if self.held_where is None:
            self.held_where = ctx.location.where

    def matches(self, rt: Runtime, ctx: Ctx) -> bool:
        if not self.resolved or self.chain.exhausted or not self._requests_match(rt):
            return False
        if self.sites is not None and ctx.site() not in self.sites:
            return False
        if self.path is not None and ctx.path() != self.path:
            return False
        crossing = self._crossed(ctx)
        if crossing is None:
            return False
        self.evals += 1
        if self.nth_eval is not None and self.evals != self.nth_eval:
            return False
        if self.after_evals is not None and self.evals <= self.after_evals:
            return False
        self.crossing = crossing or None
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "spec": self.point.to_text(),
            "hits": self.chain.hits,
            "fired": self.chain.fired,
            "exhausted": self.chain.exhausted,
            "held": self.held,
            "wired": self.wired,
            "memory": self.memory,
        }
