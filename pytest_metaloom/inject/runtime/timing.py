"""How each fault kind fails, and when, as MLX does it.

- allocator kinds and ``runtime_error``: raised *instead of* the evaluation (the
  allocator throws before the work is encoded: the outputs stay unevaluated). An
  allocator fault never fires at a wait-only point (``waits``: every array already
  evaluated or committed, so MLX allocates nothing there); it is held for the next
  evaluation that allocates. A parked error still surfaces at such a point;
- command buffer, ``sync``: the work runs, then the evaluation that committed it raises;
- command buffer, ``deferred`` (mlx >= 0.32, PR #3523): the work runs and the error is
  parked on the stream; it is raised at the next synchronisation point *of that stream*
  (``mx.eval``, ``mx.async_eval``, ``.item()``, ``.tolist()``, ``mx.synchronize``). An
  evaluation that waits for its own work (everything but ``mx.async_eval``) is such a
  point, so there it surfaces at the end of the same call;
- command buffer, ``abort`` (mlx <= 0.31): the work runs; a native thread aborts the
  process a moment later. ``mx.async_eval`` returns and Python runs on meanwhile (other
  threads write what they have); the next call that waits on that stream, like a waiting
  evaluation itself, never returns: the failed buffer never signals its event;
- ``hang``: the evaluation blocks until disarmed (bounded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytest_metaloom.inject import faults as F

from . import native
from .triggers import Ctx, Point

if TYPE_CHECKING:
    from .state import Runtime

# Operations that do not wait for their own work (MLX commits and returns).
NON_WAITING = frozenset({"async_eval"})
# Synchronisation points that evaluate nothing, so no fault can fire there.
SYNC_ONLY = frozenset({"synchronize"})
ABORT_DELAY_S = 0.01


def stream_key(rt: Runtime, stream: Any = None) -> str:
    """The stream an operation belongs to: the given one, else the thread's default."""
    mx = rt.mx
    try:
        if stream is None:
            return str(mx.default_stream(mx.default_device()))
        if isinstance(stream, mx.Stream):
            return str(stream)
        if isinstance(stream, (mx.Device, mx.DeviceType)):
            return str(mx.default_stream(stream))
        with mx.stream(stream):  # a ThreadLocalStream: this thread's concrete stream
            return str(mx.default_stream(mx.default_device()))
    except Exception:
        return "unknown"


def evaluate(
    rt: Runtime, op: str, real: Callable[..., Any], args: Any, kwargs: Any, frame: Any
) -> Any:
    """Run one evaluation or synchronisation point with the armed faults applied."""
    given = (args[0] if args else kwargs.get("stream")) if op in SYNC_ONLY else None
    stream = stream_key(rt, given)
    if stream in rt.doomed and op not in NON_WAITING:
        wait_for_death(rt, op)
    if rt.parked:
        surface(rt, stream, op, frame)
    chosen = None if op in SYNC_ONLY else choose(rt, frame, op, args)
    if chosen is None:
        return real(*args, **kwargs)
    point, term, ctx = chosen
    kind = term.kind
    assert kind is not None
    semantics = term.resolved_semantics(rt.semantics)
    text = F.message(kind, semantics, term.variant, **dict(term.params)) if kind.template else ""
    info = fired_info(rt, point, kind, semantics, ctx, stream, text)
    if kind.family == "hang":
        rt.emit("fired", timing="blocks", **info)
        hang(rt)
        return real(*args, **kwargs)
    if kind.family != "command_buffer":
        rt.emit("fired", timing="instead", **info)
        raise RuntimeError(text)
    result = real(*args, **kwargs)  # the buffer is committed: the work ran
    commit_t = time.time()
    if semantics == "sync":
        rt.emit("fired", timing="after", commit_t=commit_t, **info)
        raise RuntimeError(text)
    if semantics == "deferred":
        rt.emit("fired", timing="parked", commit_t=commit_t, **info)
        with rt.lock:
            rt.parked[stream] = (text, info)
            rt.refresh_hot()
        if op not in NON_WAITING:
            surface(rt, stream, op, frame)
        return result
    schedule_abort(rt, text, info, commit_t)
    with rt.lock:
        rt.doomed.add(stream)
        rt.refresh_hot()
    if op not in NON_WAITING:
        wait_for_death(rt, op)
    return result


def wait_for_death(rt: Runtime, op: str) -> None:
    """Block like a wait on a buffer whose completion handler threw: until the abort."""
    time.sleep(ABORT_DELAY_S + 5.0)
    rt.emit("error", error=f"the process outlived its scheduled abort (blocked in {op})")


def choose(rt: Runtime, frame: Any, op: str, args: Any) -> tuple[Point, F.Term, Ctx] | None:
    """Count a hit on every matching point; the first term that fires wins.

    A point whose hit would fire an allocator fault at a wait-only evaluation is held
    (its hit undone): MLX allocates nothing there, so its allocator cannot fail there.
    """
    with rt.lock:
        if not rt.points:
            return None
        rt.eval_index += 1
        ctx = Ctx(rt, frame, op, args)
        chosen = None
        for p in rt.points:
            saved = p.save()
            if not p.matches(rt, ctx):
                continue
            term = p.chain.hit()
            if term is None:
                continue
            if allocates(term) and ctx.wait_only():
                p.hold(saved, ctx)
                continue
            if chosen is None:
                chosen = (p, term, ctx)
        return chosen


def allocates(term: F.Term) -> bool:
    """Whether ``term`` fails in MLX's allocator (so only where something is allocated)."""
    kind = term.kind
    return kind is not None and kind.family == "allocator"


def fired_info(
    rt: Runtime, point: Point, kind: F.FaultKind, semantics: str, ctx: Ctx, stream: str, text: str
) -> dict[str, Any]:
    loc = ctx.location
    mem = ctx.memory()
    return {
        "point": point.index,
        "kind": kind.name,
        "family": kind.family,
        "semantics": semantics,
        "op": ctx.op,
        "site": loc.site,
        "path": loc.path,
        "where": loc.where,
        "stream": stream,
        "request_ids": sorted(rt.active),
        "thread": threading.current_thread().name,
        "memory": mem,
        "usage": mem["active"] + mem["cache"],
        "crossing": point.crossing,
        "held": point.held,
        "held_where": point.held_where,
        "wired_limit": point.wired if point.wired is not None else rt.wired_limit,
        "eval_index": rt.eval_index,
        "tokens": rt.tokens,
        "message": text,
    }


def surface(rt: Runtime, stream: str, op: str, frame: Any) -> None:
    """Raise (and clear) an error parked on ``stream``, as MLX's ``Error::check`` does."""
    with rt.lock:
        parked = rt.parked.pop(stream, None)
        rt.refresh_hot()
    if parked is None:
        return
    text, info = parked
    from .locate import locate

    loc = locate(frame)
    rt.emit(
        "raised",
        point=info["point"],
        kind=info["kind"],
        op=op,
        stream=stream,
        site=loc.site,
        path=loc.path,
        where=loc.where,
        fired_where=info.get("where"),
        request_ids=sorted(rt.active),
        thread=threading.current_thread().name,
        eval_index=rt.eval_index,
        message=text,
    )
    raise RuntimeError(text)


def schedule_abort(rt: Runtime, text: str, info: dict[str, Any], commit_t: float) -> None:
    line = (F.abort_line(text) + "\n").encode()
    death_due = commit_t + ABORT_DELAY_S
    rt.emit("fired", timing="abort", commit_t=commit_t, death_due_t=death_due, **info)

    def record(now: float) -> None:
        rt.emit("dying", commit_t=commit_t, death_t=now, kind=info["kind"], point=info["point"])

    native.abort_later(ABORT_DELAY_S, line, record)


def hang(rt: Runtime) -> None:
    with rt.lock:
        rt.hanging += 1
    try:
        if not rt.release.wait(rt.hang_max):
            rt.emit("error", error=f"hang released by its {rt.hang_max:g}s bound")
    finally:
        with rt.lock:
            rt.hanging -= 1
