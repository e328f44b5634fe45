"""Wait-only points: evaluations that allocate nothing, so no allocator can fail there.

MLX allocates the output buffers of an array when it *schedules* it: ``mx.eval`` and
``mx.async_eval`` put on the tape only arrays whose status is still ``unscheduled``,
set the rest ``evaluated`` and detach them from the graph (``eval_impl`` in
``mlx/transforms.cpp``; ``array::Status``). An evaluation, ``.item()`` or ``.tolist()``
of arrays that are all evaluated already, or committed by an earlier ``mx.async_eval``
(evaluated, the work maybe still running), schedules nothing: it only waits on their
events. No ``malloc`` runs, so an allocator error cannot come from there; a parked
command-buffer error can (waiting is a synchronisation point), which ``timing`` keeps.

Two ways to tell such a point were weighed:

(a) ask MLX for the arrays' state, call by call;
(b) mark mlx-lm lines that only wait (``y.item()`` after ``mx.async_eval(y)``).

(a) is what MLX itself decides on, and it covers (b): an array committed by
``mx.async_eval`` is already ``evaluated`` and detached, exactly like a finished one,
so the waits on async-committed work need no line list. A line list would also be
wrong wherever a line sometimes has new work (``logprobs[token].item()`` slices first;
``GenerationBatch._step``'s ``mx.eval(inputs, ...)`` would allocate if ``inputs`` were
not part of the graph just committed) and would need redoing for each mlx-lm version.
So this module does (a) only.

The Python API has no ``is_available``/status accessor (``mx.is_available`` is about
devices), but ``mx.export_to_dot`` writes the graph MLX still holds for the arrays it is
given: an array without a primitive (evaluated, committed, or a constant) is written as a
lone ``rank=source`` node; any pending work shows up as a primitive node. The probe runs
only when an armed allocator fault is about to fire (``timing.choose``): for pending
work it walks that graph once (about 0.7 ms for the tiny model's decode step), for a
wait a single node.
"""

from __future__ import annotations

import io
import re
from typing import Any

# One node without a primitive: MLX's export_to_dot writes it as a graph source.
_SOURCE = re.compile(r'\{ rank=source; "[^"]*"; \}')
MAX_ARRAYS = 4096


def arrays_in(mx: Any, tree: Any, limit: int = MAX_ARRAYS) -> list[Any] | None:
    """The ``mx.array`` leaves of an evaluation's arguments, or None past ``limit`` items."""
    found: list[Any] = []
    stack = [tree]
    seen = 0
    while stack:
        seen += 1
        if seen > limit:
            return None
        item = stack.pop()
        if isinstance(item, mx.array):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def only_waits(mx: Any, args: Any) -> bool:
    """True when every array in ``args`` already has its buffers (nothing to schedule).

    Anything unsure (too many leaves, an export error, a graph text this module does not
    know) answers False: the point is treated as one that allocates, as before.
    """
    arrays = arrays_in(mx, args)
    if arrays is None:
        return False
    if not arrays:
        return True  # nothing to evaluate: MLX only synchronises
    out = io.StringIO()
    try:
        mx.export_to_dot(out, *arrays)
    except Exception:
        return False
    lines = [ln.strip() for ln in out.getvalue().strip().splitlines()]
    if len(lines) < 2 or lines[0] != "digraph {" or lines[-1] != "}":
        return False
    return all(_SOURCE.fullmatch(ln) for ln in lines[1:-1])
