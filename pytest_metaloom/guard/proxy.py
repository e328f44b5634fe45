"""The listening side: relay each request to the worker byte for byte; answer for it if it dies.

Raw sockets to the worker (not a client library) so the guard always knows exactly how much of a
response already reached the client: nothing yet -> a clean 503; a started SSE stream -> an SSE
error event and ``[DONE]``. Chunks are written to the client as soon as they arrive (no buffering,
TCP_NODELAY on both legs), so streams keep their timing.

Both sockets block while a request is relayed (one ``recv`` and one ``send`` per chunk, nothing
else); the bounds on a silent worker and a stalled client live in ``watchdog.Watchdog``.
"""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import probe
from .causes import Cause, forced_cause
from .supervisor import Supervisor, WorkerRun
from .watchdog import RECV, SEND, Watch, Watchdog

# Headers that describe one hop, not the message (RFC 9110 §7.6.1); never forwarded as-is.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
_MAX_HEADER_BYTES = 65536
_RECV = 65536
# How long a handler waits, after its worker socket closed early, for the reaper to confirm a death.
_DEATH_GRACE = 1.0
_CONNECT_TIMEOUT = 2.0
# Bound on reading a request from / writing a response to a slow client.
_CLIENT_TIMEOUT = 120.0


class _ClientGone(Exception):
    """The client hung up; there is nobody left to answer."""


class _WorkerLost(Exception):
    """The worker stopped answering this request; carries the cause to report."""

    def __init__(self, cause: Cause | None) -> None:
        super().__init__(cause.describe() if cause else "worker connection lost")
        self.cause = cause


def error_body(kind: str, message: str, code: str, **extra: Any) -> bytes:
    """The structured error both the 503 body and the SSE error event carry."""
    err: dict[str, Any] = {"message": message, "type": kind, "code": code}
    err.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps({"error": err}).encode()


def _cause_error(cause: Cause | None) -> bytes:
    if cause is None:
        return error_body(
            "worker_died", "worker connection closed before the response was complete", "unknown"
        )
    return error_body(
        "worker_died",
        f"{cause.describe()}; the request was not completed, retry it",
        cause.kind,
        exit_code=cause.exit_code,
        signal=cause.signal,
    )


class GuardServer(ThreadingHTTPServer):
    """Threaded listener that hands each connection to a ``GuardHandler`` with the supervisor."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        super().__init__(address, GuardHandler)
        self.watchdog = Watchdog(supervisor.config.hang_timeout, _CLIENT_TIMEOUT, self._on_hang)

    def server_close(self) -> None:
        super().server_close()
        self.watchdog.stop()

    def _on_hang(self, watch: Watch) -> str | None:
        """No byte for ``hang_timeout``: if the worker's /health is silent too, kill and restart."""
        run: WorkerRun = watch.context
        sup = self.supervisor
        hang = sup.config.hang_timeout
        status = probe.request(run.port, sup.config.health_path, timeout=min(5.0, hang))
        if status == 200:
            # /health only says the HTTP threads live; a generation thread stuck in an
            # evaluation leaves it at 200. A one-token completion proves generation.
            generated = probe.request(
                run.port,
                sup.config.warmup_path,
                method="POST",
                body=sup.config.warmup_body,
                timeout=min(5.0, hang),
            )
            if generated == 200:
                return None
            kind = "hang"
            said = "answers 200 but a one-token completion did not finish"
        else:
            kind = "hang" if status is None else "wedged"
            said = "did not answer" if status is None else f"answered {status}"
        line = f"no byte from the worker for {hang:g}s and its /health {said}"
        if run.force_kill(forced_cause(kind, line)):
            sup.log(f"watchdog: {line}; killing worker pid={run.worker.pid}")
        return kind


class GuardHandler(BaseHTTPRequestHandler):
    """One client connection; HTTP/1.0 semantics (one request, then close) like mlx_lm.server."""

    server: GuardServer
    protocol_version = "HTTP/1.0"
    server_version = "metaloom-guard"
    timeout = _CLIENT_TIMEOUT  # until the relay starts; then the watchdog bounds the client
    _watch: Watch | None = None

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence per-request access logs: the guard logs lifecycle events only."""

    # Every method is relayed; the guard's own endpoints are matched by path.
    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    # -- own endpoints ---------------------------------------------------------------------

    def _send_json(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        head = [f"HTTP/1.0 {status} {self.responses.get(status, ('',))[0]}"]
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append("Connection: close")
        payload = ("\r\n".join(head) + "\r\n\r\n").encode()
        if self.command != "HEAD":
            payload += body
        try:
            self._write(payload)
        except _ClientGone:
            pass

    def _health(self) -> None:
        sup = self.server.supervisor
        status = sup.status()
        if sup.acquire(0) is not None:
            body = {
                "status": "ok",
                "worker_pid": status["worker_pid"],
                "restarts": status["restarts"],
            }
            self._send_json(200, json.dumps(body).encode())
            return
        code, message, retry = sup.unavailable_reason()
        body = {"status": "unavailable", "state": status["state"], "reason": message, "code": code}
        headers = {"Retry-After": str(retry)} if retry else None
        self._send_json(503, json.dumps(body).encode(), headers)

    def _unavailable(self, extra_cause: Cause | None = None) -> None:
        sup = self.server.supervisor
        code, message, retry = sup.unavailable_reason()
        if extra_cause is not None:
            body = _cause_error(extra_cause)
        else:
            body = error_body("worker_unavailable", message, code)
        headers = {"Retry-After": str(retry)} if retry else None
        self._send_json(503, body, headers)

    # -- relay -----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._health()
            return
        if path == "/metaloom/status":
            self._send_json(200, json.dumps(self.server.supervisor.status()).encode())
            return
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self._send_json(400, error_body("bad_request", "malformed request body", "bad_body"))
            return
        sup = self.server.supervisor
        deadline = time.monotonic() + sup.config.queue_timeout
        while True:
            run = sup.acquire(max(0.0, deadline - time.monotonic()))
            if run is None:
                self._unavailable()
                return
            sock = self._connect(run)
            if sock is not None:
                break
            # Refused before anything was sent: safe to wait for the next worker, if allowed.
            if not run.died.wait(_DEATH_GRACE):
                if time.monotonic() < deadline:
                    continue  # alive but its backlog is full (SYNs dropped): connect again
                self._send_json(
                    502, error_body("bad_gateway", "worker refused the connection", "refused")
                )
                return
            sup.note_dead(run)
            if time.monotonic() >= deadline:
                self._unavailable(run.cause)
                return
        watchdog = self.server.watchdog
        self._watch = watchdog.watch(sock, self.connection, run)
        try:
            sock.settimeout(None)
            self.connection.settimeout(None)
            self._relay(run, sock, body)
        except _ClientGone:
            pass
        finally:
            watchdog.unwatch(self._watch)
            self._watch = None
            sock.close()

    def _connect(self, run: WorkerRun) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_CONNECT_TIMEOUT)
        try:
            sock.connect(("127.0.0.1", run.port))
        except OSError:
            sock.close()
            return None
        return sock

    def _request_bytes(self, run: WorkerRun, body: bytes) -> bytes:
        lines = [f"{self.command} {self.path} HTTP/1.0", f"Host: 127.0.0.1:{run.port}"]
        for name, value in self.headers.items():
            low = name.lower()
            if low in _HOP_BY_HOP or low in ("host", "content-length"):
                continue
            lines.append(f"{name}: {value}")
        if body or self.command in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        lines.append(f"X-Forwarded-For: {self.client_address[0]}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _write(self, data: bytes) -> None:
        """Send to the client; while relaying, the watchdog bounds a stalled client."""
        w = self._watch
        if w is None:
            try:
                self.wfile.write(data)
            except OSError as exc:
                raise _ClientGone() from exc
            return
        w.since = time.monotonic()  # stamp before phase: the watchdog reads phase first
        w.phase = SEND
        try:
            self.connection.sendall(data)
        except OSError as exc:
            raise _ClientGone() from exc
        w.since = time.monotonic()
        w.phase = RECV

    def _recv(self, sock: socket.socket, w: Watch) -> bytes:
        """Next bytes from the worker; b'' on close; raises _WorkerLost if the watchdog cut it."""
        try:
            data = sock.recv(_RECV)
        except OSError:
            data = b""
        if not data and w.fired is not None:
            raise _WorkerLost(self._lost(w.context))
        w.since = time.monotonic()
        return data

    def _lost(self, run: WorkerRun) -> Cause | None:
        """The watchdog killed ``run``: wait (bounded) for the reaper to record why."""
        sup = self.server.supervisor
        run.died.wait(sup.config.stop_timeout + 5.0)
        sup.note_dead(run)
        return run.cause

    def _confirm_death(self, run: WorkerRun, grace: float) -> Cause | None:
        if run.died.wait(grace):
            self.server.supervisor.note_dead(run)
            return run.cause
        return None

    def _relay(self, run: WorkerRun, sock: socket.socket, body: bytes) -> None:
        w = self._watch
        assert w is not None
        try:
            sock.sendall(self._request_bytes(run, body))
        except OSError:
            pass  # the worker may still have answered or died; reading tells which
        # Phase 1: response head. Nothing has reached the client, so any failure is a clean 503.
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = self._recv(sock, w)
                if not chunk:
                    cause = self._confirm_death(run, _DEATH_GRACE)
                    if cause is None:
                        self._send_json(
                            502,
                            error_body(
                                "bad_gateway",
                                "worker closed the connection without a response",
                                "empty_response",
                            ),
                        )
                    else:
                        self._send_json(503, _cause_error(cause), {"Retry-After": "1"})
                    return
                buf += chunk
                if len(buf) > _MAX_HEADER_BYTES:
                    self._send_json(
                        502, error_body("bad_gateway", "worker response head too large", "bad_head")
                    )
                    return
        except _WorkerLost as lost:
            self._send_json(503, _cause_error(lost.cause), {"Retry-After": "1"})
            return
        head, _, rest = buf.partition(b"\r\n\r\n")
        status, out_head, framing = self._rewrite_head(head)
        self._write(out_head + rest)
        self._stream_body(run, sock, w, status, framing, rest)

    def _rewrite_head(self, head: bytes) -> tuple[int, bytes, dict[str, Any]]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
        reason = parts[2] if len(parts) > 2 else b""
        out = [b"HTTP/1.0 " + str(status).encode() + b" " + reason]
        framing: dict[str, Any] = {"length": None, "sse": False, "chunked": False}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            low = name.strip().lower()
            val = value.strip()
            if low == b"content-length" and val.isdigit():
                framing["length"] = int(val)
            elif low == b"content-type" and b"text/event-stream" in val.lower():
                framing["sse"] = True
            elif low == b"transfer-encoding" and b"chunked" in val.lower():
                framing["chunked"] = True
                out.append(line)  # relayed raw, so the client must decode it
                continue
            if low.decode("latin-1") in _HOP_BY_HOP:
                continue
            out.append(line)
        out.append(b"Connection: close")
        return status, b"\r\n".join(out) + b"\r\n\r\n", framing

    def _stream_body(
        self,
        run: WorkerRun,
        sock: socket.socket,
        w: Watch,
        status: int,
        framing: dict[str, Any],
        first: bytes,
    ) -> None:
        if self.command == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return
        length: int | None = framing["length"]
        got = len(first)
        tail = first[-64:]
        while True:
            if length is not None and got >= length:
                return
            if framing["chunked"] and tail.endswith(b"0\r\n\r\n"):
                return
            if framing["sse"] and tail.rstrip().endswith(b"data: [DONE]"):
                # Complete as far as the client is concerned; drain the close without waiting long.
                return
            try:
                data = self._recv(sock, w)
            except _WorkerLost as lost:
                self._end_broken(framing, tail, lost.cause)
                return
            if not data:
                abnormal = framing["sse"] or length is not None
                cause = self._confirm_death(run, _DEATH_GRACE if abnormal else 0.05)
                if cause is not None or abnormal:
                    self._end_broken(framing, tail, cause)
                return
            got += len(data)
            tail = (tail + data)[-64:]
            self._write(data)

    def _end_broken(self, framing: dict[str, Any], tail: bytes, cause: Cause | None) -> None:
        """The response had started and cannot be completed: close it as gracefully as possible."""
        if not framing["sse"]:
            return  # a non-stream body already on the wire cannot be taken back; close
        if cause is None:
            err = error_body(
                "upstream_error", "worker ended the stream without [DONE]", "stream_cut"
            )
        else:
            err = _cause_error(cause)
        sep = (
            b""
            if tail.endswith(b"\n\n") or not tail
            else (b"\n" if tail.endswith(b"\n") else b"\n\n")
        )
        events = sep + b"data: " + err + b"\n\ndata: [DONE]\n\n"
        if framing["chunked"]:
            events = f"{len(events):x}\r\n".encode() + events + b"\r\n0\r\n\r\n"
        self._write(events)
