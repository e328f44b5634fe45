"""One timer thread that bounds every relay's waits, so the relay itself can block for free.

A socket timeout makes CPython ``poll()`` before every ``recv``/``send``: two extra syscalls per
streamed token. Instead each relay keeps blocking sockets and stamps a ``Watch`` (plain attribute
writes, no syscalls); this thread looks at the stamps and, when a wait has gone on too long, shuts
the socket down, which wakes the blocked call at once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

RECV = 0  # waiting for the worker
SEND = 1  # writing to the client

# Longest the thread sleeps while watches exist; the detection error of a bound is at most this.
_MAX_TICK = 1.0
_MIN_TICK = 0.02


class Watch:
    """One relay's stamps: what it is waiting for (``phase``) and since when (``since``)."""

    __slots__ = ("worker", "client", "context", "phase", "since", "fired", "client_cut", "done")

    def __init__(self, worker: socket.socket, client: socket.socket, context: Any) -> None:
        self.worker = worker
        self.client = client
        self.context = context  # whatever the hang callback needs (the WorkerRun)
        self.phase = RECV
        self.since = time.monotonic()
        self.fired: Any = None  # set by the watchdog: why it cut the worker side
        self.client_cut = False  # set by the watchdog: the client stopped reading
        self.done = False


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the relay: nothing left to wake


class Watchdog:
    """Bounds worker silence (``hang_timeout``) and client stalls (``client_timeout``).

    ``on_hang(watch)`` runs on this thread when the worker has been silent for ``hang_timeout``;
    it returns a reason to cut the relay (the worker socket is then shut down) or None to keep
    waiting another full period. ``hang_timeout == 0`` disables that check.
    """

    def __init__(
        self,
        hang_timeout: float,
        client_timeout: float,
        on_hang: Callable[[Watch], Any],
    ) -> None:
        self.hang_timeout = hang_timeout
        self.client_timeout = client_timeout
        self._on_hang = on_hang
        shortest = min((t for t in (hang_timeout, client_timeout) if t > 0), default=10 * _MAX_TICK)
        self._tick = max(_MIN_TICK, min(_MAX_TICK, shortest / 10))
        self._watches: set[Watch] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="metaloom-guard-watchdog")
        self._thread.daemon = True
        self._thread.start()

    def watch(self, worker: socket.socket, client: socket.socket, context: Any) -> Watch:
        w = Watch(worker, client, context)
        with self._cond:
            self._watches.add(w)
            self._cond.notify()
        return w

    def unwatch(self, w: Watch) -> None:
        w.done = True
        with self._cond:
            self._watches.discard(w)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5.0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._watches and not self._stopped:
                    self._cond.wait()  # idle guard: no wake-ups at all
                if self._stopped:
                    return
                self._cond.wait(self._tick)
                watches = list(self._watches)
            now = time.monotonic()
            for w in watches:
                if w.done or w.fired is not None or w.client_cut:
                    continue
                waited = now - w.since
                if w.phase == SEND:
                    if waited >= self.client_timeout > 0:
                        w.client_cut = True
                        _shut(w.client)  # the blocked send raises; the relay gives up
                elif self.hang_timeout > 0 and waited >= self.hang_timeout:
                    self._check_hang(w)

    def _check_hang(self, w: Watch) -> None:
        try:
            reason = self._on_hang(w)
        except Exception as exc:  # never let one bad probe stop the bounds of every relay
            reason = f"watchdog error: {exc!r}"
        if w.done:
            return
        if reason is None:
            w.since = time.monotonic()  # worker says it is fine: give it another full period
            return
        w.fired = reason
        _shut(w.worker)
