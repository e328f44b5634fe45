"""The control socket: JSON lines from the harness (arm, disarm, status, snapshot, limits)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytest_metaloom.inject import faults as F

if TYPE_CHECKING:
    from .state import Runtime

OPS = "arm, disarm, status, snapshot, limits, ping"


def handle(rt: Runtime, req: Mapping[str, Any]) -> dict[str, Any]:
    """Answer one control request; a bad one gets ``ok: false`` and the cause."""
    op = req.get("op")
    try:
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "arm":
            return {"ok": True, **rt.arm(str(req.get("spec", "")))}
        if op == "disarm":
            return {"ok": True, **rt.disarm()}
        if op == "status":
            return {"ok": True, **rt.status()}
        if op == "snapshot":
            return {"ok": True, **rt.snapshot()}
        if op == "limits":
            base = rt.baselines()
            vals = {
                k: (req[k] if isinstance(req[k], int) else F.parse_size(str(req[k]), base))
                for k in ("wired", "memory")
                if req.get(k) is not None
            }
            return {"ok": True, **rt.apply_limits(**vals)}
    except (ValueError, TypeError) as exc:
        rt.emit("error", op=op, error=str(exc))
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown op {op!r}; expected one of {OPS}"}


def serve(rt: Runtime, path: str) -> None:
    """Listen on the Unix socket ``path`` from a daemon thread."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    threading.Thread(target=_loop, args=(rt, srv), name="metaloom-control", daemon=True).start()


def _loop(rt: Runtime, srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5.0)
            try:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                try:
                    req = json.loads(data.decode() or "{}")
                    reply = handle(rt, req if isinstance(req, dict) else {})
                except json.JSONDecodeError as exc:
                    reply = {"ok": False, "error": f"control request is not JSON: {exc}"}
                conn.sendall((json.dumps(reply, default=str) + "\n").encode())
            except OSError:
                continue
