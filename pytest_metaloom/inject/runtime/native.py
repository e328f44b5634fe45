"""Die like Metal's completion handler: abort() on a native thread, a moment later.

MLX <= 0.31 throws a command-buffer error from the completion handler, on a Metal
dispatch-queue thread, after the buffer was committed; ``libc++abi`` then calls
``abort()``. The thread that evaluated has gone on (an ``mx.async_eval`` returned), so
Python may still run, and write tokens, until the signal lands. This module starts
such a thread with ``pthread_create`` through ctypes: it is not a ``threading.Thread``,
nobody joins it, and it ends in libc's ``abort()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

_START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_KEEP: list[object] = []  # callbacks must outlive their threads


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else ctypes.CDLL(None)


def abort_later(delay_s: float, line: bytes, before_death: Callable[[float], None]) -> None:
    """Start a native thread that sleeps ``delay_s``, records, writes ``line`` to fd 2 and
    calls ``abort()``. Returns at once; raises OSError if the thread cannot be started."""
    libc = _libc()
    libc.abort.restype = None
    libc.pthread_create.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        _START,
        ctypes.c_void_p,
    ]
    libc.pthread_create.restype = ctypes.c_int
    libc.pthread_detach.argtypes = [ctypes.c_void_p]

    def run(_arg: int | None) -> int:
        time.sleep(delay_s)  # releases the GIL: the evaluating thread runs on
        try:
            before_death(time.time())
        finally:
            try:
                os.write(2, line)
            finally:
                libc.abort()
        return 0  # not reached

    callback = _START(run)
    _KEEP.append(callback)
    handle = ctypes.c_uint64(0)  # pthread_t: unsigned long (Linux) or a pointer (macOS)
    rc = libc.pthread_create(ctypes.byref(handle), None, callback, None)
    if rc != 0:
        raise OSError(rc, f"pthread_create failed: {os.strerror(rc)}")
    libc.pthread_detach(ctypes.c_void_p(handle.value))
