"""The listening side: relay each request to the worker byte for byte; answer for it if it dies.

Raw sockets to the worker (not a client library) so the guard always knows exactly how much of a
response already reached the client: nothing yet -> a clean 503; a started SSE stream -> an SSE
error event and ``[DONE]``. Chunks are written to the client as soon as they arrive (no buffering,
TCP_NODELAY on both legs), so streams keep their timing.

Both sockets block while a request is relayed (one ``recv`` and one ``send`` per chunk, nothing
else); the bounds on a silent worker and a stalled client live in ``watchdog.Watchdog``.

A worker that stays alive but fails a request (closes without a response, cuts a stream, or
answers with its own word that its generation loop died) is diagnosed before the client is
answered: wedged workers are replaced like dead ones (``failures.decide`` says how to answer).
An SSE response head is held back until the first body byte, so a stream that fails before
sending anything still gets a real status line.
"""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pytest_metaloom.guard import diagnose, probe
from pytest_metaloom.guard.causes import Cause, forced_cause
from pytest_metaloom.guard.config import GuardConfig
from pytest_metaloom.guard.evidence import read_failure, says_wedged
from pytest_metaloom.guard.failures import Reply, death_reply, decide, error_body
from pytest_metaloom.guard.supervisor import Supervisor, WorkerRun
from pytest_metaloom.guard.watchdog import RECV, SEND, Watch, Watchdog

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
# Error answers up to this size are read whole before relaying, to spot a wedged worker's words.
_ERROR_BODY_LIMIT = 65536
# How long a handler waits, after its worker socket closed early, for the reaper to confirm a death.
_DEATH_GRACE = diagnose.DEATH_GRACE
_CONNECT_TIMEOUT = 2.0
# Bound on reading a request from / writing a response to a slow client.
_CLIENT_TIMEOUT = 120.0


# A graceful server's error inside a 200 stream: that completion proves nothing.
_ERROR_EVENT = b'data: {"error"'


def _diagnosis_wait(cfg: GuardConfig) -> float:
    """How long a /health waits for a diagnosis another caller runs (its worst case, twice:
    it may first wait for a relay's own diagnosis of the same worker)."""
    one = 2 * cfg.probe_timeout + _DEATH_GRACE + cfg.stop_timeout + 5.0
    return 2 * one


class _ClientGone(Exception):
    """The client hung up; there is nobody left to answer."""


class _WorkerLost(Exception):
    """The worker stopped answering this request; carries the cause to report."""

    def __init__(self, cause: Cause | None) -> None:
        super().__init__(cause.describe() if cause else "worker connection lost")
        self.cause = cause


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
        """No byte for ``hang_timeout``: replace the worker only if it is proven hung or wedged."""
        run: WorkerRun = watch.context
        sup = self.supervisor
        # a hung relay: whatever proved the worker before is void until a completion finishes
        run.proof.doubt(f"a request got no byte from the worker for {sup.config.hang_timeout:g}s")
        found = diagnose.hang_check(run, sup.config)
        if found is None:
            return None
        kind, evidence = found
        line = f"no byte from the worker for {sup.config.hang_timeout:g}s and {evidence}"
        sup.retire(run, forced_cause(kind, line))  # logs the evidence
        return kind


class GuardHandler(BaseHTTPRequestHandler):
    """One client connection; HTTP/1.0 semantics (one request, then close) like mlx_lm.server."""

    server: GuardServer
    protocol_version = "HTTP/1.0"
    server_version = "metaloom-guard"
    timeout = _CLIENT_TIMEOUT  # until the relay starts; then the watchdog bounds the client
    _watch: Watch | None = None
    _token = -1  # the worker's proof epoch when this request was sent (``proof.Proof.token``)

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
        """200 only while the worker is proven serving (``proof``); else 503 and why.

        The worker's own /health is asked each time (cheap, and a wedged mlx_lm.server says
        503 there), but its 200 is not trusted: the guard also needs a standing proof, a
        completion the worker finished since the last failed or hung relay (and within
        ``--proof-window``). Without one it diagnoses first (shared by concurrent callers).
        """
        sup = self.server.supervisor
        run = sup.acquire(0)
        if run is not None:
            cfg = sup.config
            answer = probe.call(run.port, cfg.health_path, timeout=cfg.probe_timeout)
            why = run.proof.unproven(cfg.proof_window) if answer.ok else None
            if answer.ok and why is None:
                self._healthy(run)
                return
            ok = answer.ok
            found = run.proof.shared(lambda: self._prove(run, ok), _diagnosis_wait(cfg))
            if found is not None and not found[1] and not ok:
                # the leader found a standing proof, but this caller saw the worker's /health fail
                found = self._prove(run, False)
            health = found[0] if found is not None else None
            if health is not None and health.state == diagnose.SERVING:
                self._healthy(run)
                return
            if health is not None and health.state == diagnose.WEDGED:
                sup.retire(run, forced_cause("wedged", health.evidence))
            elif health is None or health.state != diagnose.DEAD:
                evidence = health.evidence if health else "a check of the worker is under way"
                reason = "the worker is not proven serving"
                if why:
                    reason += f" ({why})"
                body = {
                    "status": "unavailable",
                    "state": "unverified",
                    "reason": f"{reason}: {evidence}",
                    "code": "worker_unhealthy",
                }
                self._send_json(503, json.dumps(body).encode(), {"Retry-After": "1"})
                return
            run.died.wait(_DEATH_GRACE)  # let the reaper name the cause the answer reports
        status = sup.status()
        code, message, retry = sup.unavailable_reason()
        body = {"status": "unavailable", "state": status["state"], "reason": message, "code": code}
        headers = {"Retry-After": str(retry)} if retry else None
        self._send_json(503, json.dumps(body).encode(), headers)

    def _prove(self, run: WorkerRun, own_ok: bool) -> tuple[diagnose.Health, bool]:
        """One diagnosis for /health: (health, whether the worker was probed).

        A serving verdict is a proof (its completion finished). ``own_ok``: the worker's own
        /health just answered 200, so a proof that came in meanwhile (a diagnosis that just
        ended, a relayed completion) is enough and nothing is sent to the worker.
        """
        cfg = self.server.supervisor.config
        if own_ok and run.proof.unproven(cfg.proof_window) is None:
            return diagnose.Health(diagnose.SERVING, run.proof.proven_by), False
        token = run.proof.token()
        health = diagnose.check(run, cfg)
        if health.state == diagnose.SERVING:
            run.proof.proven(token, "a one-token completion the guard sent")
        return health, True

    def _healthy(self, run: WorkerRun) -> None:
        body = {
            "status": "ok",
            "worker_pid": run.worker.pid,
            "restarts": self.server.supervisor.status()["restarts"],
            "proven_by": run.proof.proven_by or None,
        }
        self._send_json(200, json.dumps(body).encode())

    def _unavailable(self) -> None:
        sup = self.server.supervisor
        code, message, retry = sup.unavailable_reason()
        body = error_body("worker_unavailable", message, code)
        headers = {"Retry-After": str(retry)} if retry else None
        self._send_json(503, body, headers)

    def _reply(self, reply: Reply) -> None:
        self._send_json(reply.status, reply.body, reply.headers)

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
            if sock is None:
                # Refused before anything was sent: safe to wait for the next worker, if allowed.
                if not run.died.wait(_DEATH_GRACE):
                    if time.monotonic() < deadline:
                        continue  # alive but its backlog is full (SYNs dropped): connect again
                    self._send_json(
                        503,
                        error_body(
                            "worker_busy",
                            "worker refused the connection (its listen backlog is full)",
                            "refused",
                        ),
                        {"Retry-After": "1"},
                    )
                    return
                sup.note_dead(run)
                if time.monotonic() >= deadline:
                    self._reply(death_reply(run.cause))
                    return
                continue
            reply = self._relay_once(run, sock, body)
            if reply is None:
                return
            if reply.retry and time.monotonic() < deadline:
                continue  # the request never reached a generation loop: the next worker gets it
            self._reply(reply)
            return

    def _relay_once(self, run: WorkerRun, sock: socket.socket, body: bytes) -> Reply | None:
        """Relay one attempt; a Reply when nothing reached the client and one must be sent."""
        watchdog = self.server.watchdog
        self._watch = watchdog.watch(sock, self.connection, run)
        try:
            sock.settimeout(None)
            self.connection.settimeout(None)
            return self._relay(run, sock, body)
        except _ClientGone:
            return None
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

    @staticmethod
    def _death_answer(run: WorkerRun, cause: Cause | None) -> Reply:
        """The answer for a request ``run``'s end cut: the failure the guard already proved
        for this run when it retired it (so requests ended by one failure hear one answer),
        else the death's own cause."""
        return run.failure_reply if run.failure_reply is not None else death_reply(cause)

    def _lost(self, run: WorkerRun) -> Cause | None:
        """The watchdog ended ``run``: wait (bounded) for the reaper to record why."""
        sup = self.server.supervisor
        run.died.wait(sup.config.stop_timeout + 5.0)
        sup.note_dead(run)
        return run.cause or run.retired

    def _confirm_death(self, run: WorkerRun, grace: float) -> Cause | None:
        if run.died.wait(grace):
            self.server.supervisor.note_dead(run)
            return run.cause
        return None

    def _failed(self, run: WorkerRun, mark: int, *, said_wedged: bool = False) -> Reply:
        """The worker failed this request while alive (or so it seemed): prove what happened.

        A dead worker's cause wins; otherwise its log since ``mark`` and its answers to a
        /health and a one-token completion decide (``failures.decide``), and a wedged or
        memory-suspect worker is replaced before the client hears back, so that a /health
        asked after the answer never sees the old worker as serving.
        """
        sup = self.server.supervisor
        if self._watch is not None:
            # the worker's side is over: the hang bound must not fire on the diagnosis itself
            self._watch.done = True
        run.proof.doubt(f"a relayed {self.command} {self.path.split('?', 1)[0]} failed")
        if run.failure_reply is not None:
            return run.failure_reply  # the failure that ended this run is already proven
        cause = self._confirm_death(run, 0.05)
        if cause is not None:
            return self._death_answer(run, cause)
        failure = read_failure(run.log_since(mark))
        token = run.proof.token()
        health = diagnose.check(run, sup.config)
        if health.state == diagnose.SERVING:
            run.proof.proven(token, "a one-token completion the guard sent")
        if health.state == diagnose.DEAD:
            if run.retired is not None:
                return self._death_answer(run, run.retired)
            return self._death_answer(run, self._confirm_death(run, _DEATH_GRACE))
        reply = decide(health, failure, said_wedged=said_wedged)
        if reply.cause is not None:
            if run.failure_reply is None and not reply.retry:
                run.failure_reply = reply
            sup.retire(run, reply.cause)
        return reply

    def _relay(self, run: WorkerRun, sock: socket.socket, body: bytes) -> Reply | None:
        w = self._watch
        assert w is not None
        mark = run.log_mark()
        self._token = run.proof.token()
        try:
            sock.sendall(self._request_bytes(run, body))
        except OSError:
            pass  # the worker may still have answered or died; reading tells which
        # Phase 1: response head. Nothing has reached the client, so any failure is a clean answer.
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = self._recv(sock, w)
                if not chunk:
                    return self._failed(run, mark)
                buf += chunk
                if len(buf) > _MAX_HEADER_BYTES:
                    return Reply(
                        502,
                        error_body("bad_gateway", "worker response head too large", "bad_head"),
                        retry_after=False,
                    )
        except _WorkerLost as lost:
            return self._death_answer(run, lost.cause)
        head, _, rest = buf.partition(b"\r\n\r\n")
        status, out_head, framing = self._rewrite_head(head)
        if status >= 400 and not framing["sse"] and self.command != "HEAD":
            try:
                rest, complete = self._read_error_body(sock, w, framing, rest)
            except _WorkerLost as lost:
                return self._death_answer(run, lost.cause)
            if says_wedged(rest):
                return self._failed(run, mark, said_wedged=True)
            if self.command == "POST" and (status >= 500 or status == 404):
                # the worker failed a completion in its own words: its /health must be re-proven
                path = self.path.split("?", 1)[0]
                run.proof.doubt(f"the worker answered {status} to POST {path}")
            self._write(out_head + rest)
            if not complete:
                self._stream_body(run, sock, w, status, framing, rest, mark)
            return None
        if framing["sse"] and not rest:
            framing["held_head"] = out_head  # sent with the first body byte
        else:
            self._write(out_head + rest)
        return self._stream_body(run, sock, w, status, framing, rest, mark)

    def _read_error_body(
        self, sock: socket.socket, w: Watch, framing: dict[str, Any], first: bytes
    ) -> tuple[bytes, bool]:
        """Read a small error answer whole (bounded); (body so far, complete?)."""
        length: int | None = framing["length"]
        body = first
        while len(body) < _ERROR_BODY_LIMIT:
            if length is not None and len(body) >= length:
                return body, True
            if framing["chunked"] and body.endswith(b"0\r\n\r\n"):
                return body, True
            data = self._recv(sock, w)
            if not data:
                return body, True
            body += data
        return body, False

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
        mark: int,
    ) -> Reply | None:
        """Relay the rest of the body; a Reply if it failed before anything reached the client."""
        if self.command == "HEAD" or status in (204, 304) or 100 <= status < 200:
            if framing.get("held_head"):
                self._write(framing.pop("held_head"))
            return None
        length: int | None = framing["length"]
        got = len(first)
        tail = first[-64:]
        sse = framing["sse"]
        if sse and _ERROR_EVENT in first:
            framing["error_event"] = True
        while True:
            if length is not None and got >= length:
                return self._finished(run, status, framing)
            if framing["chunked"] and tail.endswith(b"0\r\n\r\n"):
                return self._finished(run, status, framing)
            if sse and tail.rstrip().endswith(b"data: [DONE]"):
                # Complete as far as the client is concerned; drain the close without waiting long.
                return self._finished(run, status, framing)
            try:
                data = self._recv(sock, w)
            except _WorkerLost as lost:
                answer = self._death_answer(run, lost.cause)
                if framing.get("held_head"):
                    return answer
                self._end_broken(framing, tail, answer.body)
                return None
            if not data:
                abnormal = framing["sse"] or length is not None
                cause = self._confirm_death(run, 0.05)
                if cause is None and not abnormal:
                    return self._finished(run, status, framing)  # a close-delimited body ended
                reply = (
                    self._death_answer(run, cause) if cause is not None else self._failed(run, mark)
                )
                if framing.get("held_head"):
                    return reply  # nothing reached the client yet: a real status line
                self._end_broken(framing, tail, reply.body)
                return None
            got += len(data)
            joined = tail + data
            if sse and _ERROR_EVENT in joined:
                framing["error_event"] = True
            tail = joined[-64:]
            held = framing.pop("held_head", None)
            self._write(held + data if held else data)

    def _finished(self, run: WorkerRun, status: int, framing: dict[str, Any]) -> None:
        """A response ended well: a completion answered 2xx in full proves the worker serving."""
        if self.command == "POST" and 200 <= status < 300 and not framing.get("error_event"):
            run.proof.proven(self._token, "a relayed completion")

    def _end_broken(self, framing: dict[str, Any], tail: bytes, err: bytes) -> None:
        """The response had started and cannot be completed: close it as gracefully as possible."""
        if not framing["sse"]:
            return  # a non-stream body already on the wire cannot be taken back; close
        sep = (
            b""
            if tail.endswith(b"\n\n") or not tail
            else (b"\n" if tail.endswith(b"\n") else b"\n\n")
        )
        events = sep + b"data: " + err + b"\n\ndata: [DONE]\n\n"
        if framing["chunked"]:
            events = f"{len(events):x}\r\n".encode() + events + b"\r\n0\r\n\r\n"
        self._write(events)
