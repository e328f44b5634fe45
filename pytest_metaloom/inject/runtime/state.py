"""The in-server injector state: armed points, parked errors, limits, requests, events.

One ``Runtime`` per server process. The hot path (an evaluation with nothing armed and
nothing parked) costs one attribute check in the wrappers (``patches.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from pytest_metaloom.inject import faults as F

from .triggers import Point

REQUEST_HEADER = "X-Metaloom-Request-Id"
REQUEST_ATTR = "_metaloom_request_id"


class Runtime:
    """All in-server injector state."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import mlx.core as mx

        self.mx = mx
        self.env = env
        self.lock = threading.RLock()
        self.hot = False
        self.points: list[Point] = []
        self.spec_text: str | None = None
        self.parked: dict[str, tuple[str, dict[str, Any]]] = {}  # stream -> deferred error
        self.doomed: set[str] = set()  # streams whose failed buffer will abort the process
        self.release = threading.Event()
        self.hanging = 0
        self.hang_max = float(env.get("METALOOM_HANG_MAX", "900"))
        self.eval_index = 0
        self.tokens = 0
        self.requests_started = 0
        self.active: dict[str, int] = {}
        self.anon = 0
        self.response_generator: Any = None
        self.wired_limit: int | None = None
        self.memory_limit: int | None = None
        self.restore: dict[str, int] = {}  # limit -> value before this arming lowered it
        self.deferred_env: list[str] = []
        self.events_fd: int | None = None
        self.mlx_version = getattr(mx, "__version__", "0")
        self.semantics = env.get("METALOOM_SEMANTICS") or F.default_semantics(self.mlx_version)
        if self.semantics not in ("abort", "deferred", "sync"):
            raise ValueError(
                f"METALOOM_SEMANTICS={self.semantics!r} is not valid; use 'abort', 'deferred' "
                "or 'sync'"
            )
        if env.get("METALOOM_EVENTS"):
            self.events_fd = os.open(
                env["METALOOM_EVENTS"], os.O_APPEND | os.O_CREAT | os.O_WRONLY, 0o644
            )

    # ------------------------------------------------------------------ events

    def emit(self, event: str, **fields: Any) -> None:
        """One ``os.write`` per JSON line, so lines stay whole and survive an abort."""
        if self.events_fd is None:
            return
        record = {"t": time.time(), "pid": os.getpid(), "event": event, **fields}
        data = (json.dumps(record, default=str) + "\n").encode()
        with contextlib.suppress(OSError):
            os.write(self.events_fd, data)

    def memory(self) -> dict[str, int]:
        mx = self.mx
        return {
            "active": mx.get_active_memory(),
            "cache": mx.get_cache_memory(),
            "peak": mx.get_peak_memory(),
        }

    def cache_state(self) -> dict[str, int] | None:
        rg = self.response_generator
        pc = getattr(rg, "prompt_cache", None) if rg is not None else None
        if pc is None:
            return None
        try:
            return {"sequences": len(pc), "bytes": int(pc.nbytes)}
        except Exception:  # the generation thread may be tearing it down
            return None

    def baselines(self) -> dict[str, int]:
        mem = self.memory()
        limit = 0
        with contextlib.suppress(Exception):
            info = self.mx.device_info()
            limit = int(info.get("max_recommended_working_set_size", 0))
        if not limit:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {
            "active": mem["active"] + mem["cache"],
            "allocated": mem["active"],
            "peak": mem["peak"],
            "limit": limit,
        }

    def refresh_hot(self) -> None:
        self.hot = bool(self.points) or bool(self.parked) or bool(self.doomed)

    # ------------------------------------------------------------------ arming

    def arm(self, text: str, *, defer_sizes: bool = False) -> dict[str, Any]:
        spec = F.parse_spec(text)
        self._restore_limits()  # a re-arm replaces the last arming, limits included
        with self.lock:
            self.points = [Point(i, p, self) for i, p in enumerate(spec.points)]
            self.spec_text = spec.to_text()
            self.release.clear()
            sizes = {} if defer_sizes else self.resolve_points()
            self.refresh_hot()
        self.emit(
            "armed",
            spec=self.spec_text,
            sizes=sizes,
            deferred_sizes=defer_sizes and any(not p.resolved for p in self.points),
            semantics_default=self.semantics,
        )
        return {"spec": self.spec_text, "points": len(self.points), "sizes": sizes}

    def resolve_points(self) -> dict[str, dict[str, int]]:
        base = self.baselines()
        out: dict[str, dict[str, int]] = {}
        for p in self.points:
            if p.resolved:
                continue
            got = p.resolve(base)
            out[str(p.index)] = got
            if "memory" in got:
                self.mx.reset_peak_memory()  # the memory counter is the peak since now
            if got:
                self.apply_limits(wired=got.get("wired"), memory=got.get("memory"), source="arm")
        return out

    def disarm(self) -> dict[str, Any]:
        with self.lock:
            summary = [p.summary() for p in self.points]
            self.points = []
            self.spec_text = None
            self.refresh_hot()
            self.release.set()
        restored = self._restore_limits()
        fired = sum(p["fired"] for p in summary)
        self.emit("disarmed", points=summary, fired=fired, restored=restored)
        return {
            "points": summary,
            "fired": fired,
            "hits": sum(p["hits"] for p in summary),
            "restored": restored,
        }

    # ------------------------------------------------------------------ limits

    def apply_limits(
        self,
        wired: int | None = None,
        memory: int | None = None,
        *,
        source: str = "control",
    ) -> dict[str, Any]:
        """Set the real MLX limits (accepted, not enforced, on the CPU and CUDA backends).

        Limits lowered by an arming (``source="arm"``) remember the value they replaced;
        disarming puts it back.
        """
        result: dict[str, Any] = {"source": source}
        for key, value, setter in (
            ("wired", wired, self.mx.set_wired_limit),
            ("memory", memory, self.mx.set_memory_limit),
        ):
            if value is None:
                continue
            try:
                previous = int(setter(int(value)))
                result[key] = {"value": int(value), "previous": previous, "accepted": True}
                setattr(self, f"{key}_limit", int(value))
                if source == "arm":
                    self.restore.setdefault(key, previous)
            except (ValueError, RuntimeError) as exc:
                result[key] = {"value": int(value), "accepted": False, "error": str(exc)}
        self.emit("limits", **result)
        return result

    def _restore_limits(self) -> dict[str, int]:
        restored, self.restore = self.restore, {}
        if not restored:
            return {}
        for key, value in restored.items():
            setter = self.mx.set_wired_limit if key == "wired" else self.mx.set_memory_limit
            try:
                setter(int(value))
                setattr(self, f"{key}_limit", int(value))
            except (ValueError, RuntimeError) as exc:
                self.emit("error", error=f"restoring the {key} limit to {value}: {exc}")
        self.emit("limits", source="restore", **{k: {"value": v} for k, v in restored.items()})
        return restored

    def limits_from_text(self, text: str, source: str) -> dict[str, Any]:
        values = parse_limits(text)
        base = self.baselines()
        return self.apply_limits(
            **{k: F.parse_size(v, base) for k, v in values.items()}, source=source
        )

    # ------------------------------------------------------------------ requests

    def request_start(self, request: Any) -> None:
        rid = getattr(request, REQUEST_ATTR, None)
        if rid is None or rid in self.active:
            return
        with self.lock:
            self.requests_started += 1
            self.active[rid] = self.requests_started
            deferred, self.deferred_env = self.deferred_env, []
        for what in deferred:
            self._apply_deferred(what)
        self.emit(
            "request_start",
            request_id=rid,
            ordinal=self.active.get(rid),
            cache=self.cache_state(),
            memory=self.memory(),
        )

    def _apply_deferred(self, what: str) -> None:
        try:
            if what == "limits":
                self.limits_from_text(self.env["METALOOM_LIMITS"], source="env")
            else:
                with self.lock:
                    sizes = self.resolve_points()
                self.emit("armed", spec=self.spec_text, sizes=sizes, resolved=True)
        except Exception as exc:
            self.emit("error", error=f"{what}: {exc}")

    def request_end(self, rid: str) -> None:
        with self.lock:
            self.active.pop(rid, None)
        self.emit("request_end", request_id=rid, cache=self.cache_state(), memory=self.memory())

    # ------------------------------------------------------------------ reports

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "spec": self.spec_text,
                "points": [p.summary() for p in self.points],
                "parked": {k: v[0] for k, v in self.parked.items()},
                "hanging": self.hanging,
                "eval_index": self.eval_index,
                "tokens": self.tokens,
                "requests_started": self.requests_started,
                "active_requests": sorted(self.active),
                "semantics_default": self.semantics,
                "mlx_version": self.mlx_version,
            }

    def snapshot(self) -> dict[str, Any]:
        return {
            "memory": self.memory(),
            "cache": self.cache_state(),
            "wired_limit": self.wired_limit,
            "memory_limit": self.memory_limit,
            "baselines": self.baselines(),
        }


def parse_limits(text: str) -> dict[str, str]:
    """``wired=SIZE,memory=SIZE`` -> {key: SIZE text}; a ``ValueError`` naming the part."""
    from pytest_metaloom import units

    try:
        return units.parse_limits(text)
    except units.SizeError as exc:
        raise ValueError(f"METALOOM_LIMITS={text!r}: {exc.problem}") from None
