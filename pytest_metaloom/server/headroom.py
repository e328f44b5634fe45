"""The headroom helper: another process holds all but N bytes of the GPU.

MLX's CUDA backend does not enforce ``mx.set_memory_limit`` (measured on an H200,
mlx-cuda-13 0.32.4: a 4 GiB array evaluates under a 1 GiB limit), so on CUDA the only
way to make the allocator fail for real is the way a user's box runs out: something
else holds the memory. This module is both sides of that:

- :class:`HeadroomHelper` (harness side) starts the helper, tells it how much to leave
  free, and always releases it: on ``stop()`` (a pytest session stops its own helper at
  its teardown, which Ctrl-C and SIGTERM reach: ``matrix/backends.DeviceSession``), at
  interpreter exit (``release_all``), and, should the harness be killed outright,
  because the helper exits as soon as its stdin closes.
- ``python -m pytest_metaloom.server.headroom`` (helper side) holds memory with PyTorch
  when it is installed, else with MLX itself in this second process.

Protocol: one JSON object per line. The helper first prints ``{"ok": true, "ready": ...}``;
then answers ``{"op": "hold", "headroom": BYTES}``, ``{"op": "release"}`` and
``{"op": "info"}`` with ``{"ok": ..., "held": ..., "free": ..., "total": ...}``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

BACKENDS = ("auto", "torch", "mlx")
CHUNK = 1 << 30  # hold in pieces so the last ones can fit closely around the target
FINE = (256 << 20, 32 << 20)


class HeadroomError(RuntimeError):
    """The helper could not start, answered an error, or did not answer in time."""


# ---------------------------------------------------------------------- harness side

_LIVE: set[HeadroomHelper] = set()


def release_all() -> None:
    """Stop every helper this process still runs: the net of a dying process (atexit) and of
    scripts. Never a pytest session's teardown: an inner pytester session would stop the
    outer session's helper (a session stops its own, ``backends.DeviceSession``)."""
    for helper in list(_LIVE):
        with contextlib.suppress(Exception):
            helper.stop()


atexit.register(release_all)


def helper_command(backend: str = "auto") -> list[str]:
    """The command line of the real helper (tests pass a stand-in's instead)."""
    if backend not in BACKENDS:
        raise ValueError(f"headroom backend {backend!r} is unknown; use one of {BACKENDS}")
    return [sys.executable, "-m", "pytest_metaloom.server.headroom", "--backend", backend]


class HeadroomHelper:
    """A helper process that leaves only ``headroom`` bytes of the device free."""

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        backend: str = "auto",
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = list(command) if command else helper_command(backend)
        self.timeout = timeout
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> HeadroomHelper:
        if self.is_alive():
            return self
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=self.env,
        )
        _LIVE.add(self)
        for stream, sink in ((self.proc.stdout, self._lines.put), (self.proc.stderr, None)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()
        try:
            self.ready = self._answer("start")
        except HeadroomError:
            self.stop()  # a helper that refused must not linger
            raise
        return self

    def _pump(self, stream: Any, sink: Any) -> None:
        for line in stream:
            if sink is not None:
                sink(line)
            else:
                self._stderr = (self._stderr + [line])[-40:]
        if sink is not None:
            sink(None)

    def _answer(self, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self.stop()
            raise HeadroomError(
                f"the headroom helper ({' '.join(self.command)}) gave no answer to {what} "
                f"within {self.timeout:.0f} s; it was stopped"
            ) from None
        if line is None:
            code = self.proc.wait(5) if self.proc is not None else None
            _LIVE.discard(self)
            raise HeadroomError(
                f"the headroom helper exited (code {code}) during {what}: "
                f"{''.join(self._stderr[-8:]).strip() or 'no output'}"
            )
        try:
            answer = json.loads(line)
        except ValueError:
            raise HeadroomError(f"the headroom helper answered {what} with {line!r}") from None
        if not answer.get("ok"):
            raise HeadroomError(f"the headroom helper refused {what}: {answer.get('error')}")
        self.last = answer
        return answer

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self.is_alive() or self.proc is None or self.proc.stdin is None:
            raise HeadroomError("the headroom helper is not running; start() it first")
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer(request["op"])

    def hold(self, headroom: int, *, follow: bool = False) -> dict[str, Any]:
        """Hold all but ``headroom`` bytes of the device (grows or shrinks what is held).

        ``follow``: keep taking whatever the device frees later (every 0.1 s), as a
        greedy neighbour would, until the next ``hold`` or ``release``.
        """
        if headroom < 0:
            raise ValueError(f"headroom must be >= 0 bytes, got {headroom}")
        return self._call({"op": "hold", "headroom": int(headroom), "follow": bool(follow)})

    def release(self) -> dict[str, Any]:
        return self._call({"op": "release"})

    def info(self) -> dict[str, Any]:
        return self._call({"op": "info"})

    def stop(self, timeout: float = 10.0) -> int | None:
        """Release everything: close stdin (the helper exits), then terminate, then kill."""
        proc = self.proc
        if proc is None:
            _LIVE.discard(self)
            return None
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()
            for action in (None, proc.terminate, proc.kill):
                if action is not None:
                    with contextlib.suppress(OSError):
                        action()
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        _LIVE.discard(self)
        return proc.returncode

    def __enter__(self) -> HeadroomHelper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- helper side


def _free_from_nvidia_smi() -> tuple[int, int]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise HeadroomError("nvidia-smi is not on PATH; cannot read free device memory")
    out = subprocess.run(
        [exe, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    free, total = (int(v) << 20 for v in out.strip().splitlines()[0].split(","))
    return free, total


class _Holder:
    """Allocates device memory in chunks until only ``headroom`` bytes stay free."""

    def __init__(self, backend: str) -> None:
        self.chunks: list[Any] = []
        self.held = 0
        if backend == "auto":
            try:
                import torch

                backend = "torch" if torch.cuda.is_available() else "mlx"
            except ImportError:
                backend = "mlx"
        self.backend = backend
        if backend == "torch":
            import torch

            if not torch.cuda.is_available():
                raise HeadroomError("torch is installed but sees no CUDA device")
            self.torch = torch
            torch.cuda.init()
        else:
            import mlx.core as mx

            if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
                raise HeadroomError("neither PyTorch nor MLX sees a CUDA device here")
            mx.set_cache_limit(0)  # a freed chunk must go back to the device, not MLX's cache
            self.mx = mx

    def free(self) -> tuple[int, int]:
        if self.backend == "torch":
            return tuple(int(v) for v in self.torch.cuda.mem_get_info())  # type: ignore[return-value]
        return _free_from_nvidia_smi()

    def _take(self, size: int) -> bool:
        try:
            if self.backend == "torch":
                chunk = self.torch.empty(size, dtype=self.torch.uint8, device="cuda")
            else:
                chunk = self.mx.zeros((size,), dtype=self.mx.uint8)
                self.mx.eval(chunk)
        except (RuntimeError, MemoryError):
            return False
        self.chunks.append((size, chunk))
        self.held += size
        return True

    def _drop_one(self) -> None:
        size, _ = self.chunks.pop()
        self.held -= size
        self._settle()

    def _settle(self) -> None:
        if self.backend == "torch":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        else:
            self.mx.clear_cache()

    def hold(self, headroom: int) -> None:
        free, _ = self.free()
        while free < headroom and self.chunks:  # too little left: give some back
            self._drop_one()
            free, _ = self.free()
        for size in (CHUNK, *FINE):
            while free - size >= headroom:
                if not self._take(size):
                    break
                free, _ = self.free()

    def release(self) -> None:
        self.chunks.clear()
        self.held = 0
        self._settle()

    def state(self) -> dict[str, Any]:
        free, total = self.free()
        return {
            "ok": True,
            "backend": self.backend,
            "held": self.held,
            "free": free,
            "total": total,
        }


def _follow(holder: _Holder, lock: threading.Lock, target: list[int | None]) -> None:
    """Re-take freed memory while a ``follow`` hold is in force."""
    import time

    while True:
        time.sleep(0.1)
        with lock:
            if target[0] is not None:
                with contextlib.suppress(Exception):
                    holder.hold(target[0])


def _serve(backend: str) -> int:
    try:
        holder = _Holder(backend)
        print(json.dumps({**holder.state(), "ready": True, "pid": os.getpid()}), flush=True)
    except Exception as exc:  # the harness reads this line and names the cause
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    lock = threading.Lock()
    target: list[int | None] = [None]
    threading.Thread(target=_follow, args=(holder, lock, target), daemon=True).start()
    for line in sys.stdin:  # EOF (the harness closed the pipe or died): release and exit
        try:
            request = json.loads(line)
            op = request.get("op")
            with lock:
                target[0] = None
                if op == "hold":
                    holder.hold(int(request["headroom"]))
                    if request.get("follow"):
                        target[0] = int(request["headroom"])
                elif op == "release":
                    holder.release()
                elif op != "info":
                    raise ValueError(f"unknown op {op!r}")
                answer = holder.state()
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    with lock:
        target[0] = None
        holder.release()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pytest_metaloom.server.headroom",
        description="Hold all but a chosen headroom of GPU memory (JSON lines on stdin).",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    args = parser.parse_args(argv)
    return _serve(args.backend)


if __name__ == "__main__":
    raise SystemExit(main())
