"""Adversarial stand-in HTTP servers (NOT mlx_lm.server) for the workload client and oracle.

Each behaviour is a script of raw writes (bytes, then a pause) that a real server, a
proxy or a patched server could produce: valid-but-unusual HTTP framing and SSE that a
hand-written client gets wrong, and broken answers a lenient client would accept. The
real server cannot be made to emit these on demand, hence the stand-in.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ERROR = {"error": {"message": "out of memory", "type": "server_overloaded", "code": 503}}
ERROR_BYTES = json.dumps(ERROR).encode()
TOKEN = b'{"choices": [{"index": 0, "delta": {"content": "a"}}]}'
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def _json_head(status: str, length: int | str | None, version: bytes = b"HTTP/1.1") -> bytes:
    head = version + b" " + status.encode() + b"\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n".encode()
    return head + b"Connection: close\r\n\r\n"


def _chunked(body: bytes, size: int = 7) -> bytes:
    out = b""
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass(frozen=True)
class Behaviour:
    """Writes (bytes, pause after) then close, or keep the socket open and silent."""

    writes: tuple[tuple[bytes, float], ...]
    hold: bool = False  # never close: the client must give up by its own bound


def _once(data: bytes, *, hold: bool = False) -> Behaviour:
    return Behaviour(((data, 0.0),), hold)


MULTILINE_ERROR = json.dumps(ERROR, indent=1).encode().split(b"\n")

BEHAVIOURS: dict[str, Behaviour] = {
    # valid HTTP, a correct 503 + structured error, framed in different legal ways
    "graceful_503": _once(_json_head("503 Service Unavailable", len(ERROR_BYTES)) + ERROR_BYTES),
    "chunked_503": _once(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + _chunked(ERROR_BYTES)
    ),
    "no_length_503": _once(_json_head("503 Service Unavailable", None, b"HTTP/1.0") + ERROR_BYTES),
    "split_headers_503": Behaviour(
        tuple(
            (piece, 0.02)
            for piece in _split(
                _json_head("503 Service Unavailable", len(ERROR_BYTES)) + ERROR_BYTES, 9
            )
        )
    ),
    # valid SSE streams that started, then ended with an error event and [DONE]
    "sse_nospace_error": _once(
        SSE_HEAD + b"data:" + TOKEN + b"\n\ndata:" + ERROR_BYTES + b"\n\ndata:[DONE]\n\n"
    ),
    "sse_multiline_error": _once(
        SSE_HEAD
        + b"data: "
        + TOKEN
        + b"\n\n"
        + b"".join(b"data: " + line + b"\n" for line in MULTILINE_ERROR)
        + b"\ndata: [DONE]\n\n"
    ),
    "sse_comments_crlf_event_error": _once(
        SSE_HEAD
        + b": keep-alive\r\n\r\n"
        + b"event: error\r\nid: 7\r\ndata: "
        + ERROR_BYTES
        + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    ),
    "sse_chunked_error": _once(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        + _chunked(b"data: " + TOKEN + b"\n\ndata: " + ERROR_BYTES + b"\n\ndata: [DONE]\n\n", 5)
    ),
    # wrong answers
    "answers_500": _once(_json_head("500 Internal Server Error", len(ERROR_BYTES)) + ERROR_BYTES),
    "ok_with_error_body": _once(_json_head("200 OK", len(ERROR_BYTES)) + ERROR_BYTES),
    "plain_text_503": _once(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\noom"
    ),
    "bad_content_length": _once(_json_head("503 Service Unavailable", "abc") + ERROR_BYTES),
    "short_content_length": _once(_json_head("200 OK", 999) + b'{"choices": ['),
    "no_status_line": _once(b""),
    "garbage_status_line": _once(b"HELLO there\r\n\r\n"),
    "sse_error_before_any_token": _once(
        SSE_HEAD + b"data: " + ERROR_BYTES + b"\n\ndata: [DONE]\n\n"
    ),
    "sse_without_done": _once(SSE_HEAD + b"data: " + TOKEN + b"\n\ndata: " + ERROR_BYTES + b"\n\n"),
    "sse_done_without_error": _once(SSE_HEAD + b"data: " + TOKEN + b"\n\ndata: [DONE]\n\n"),
    "sse_error_cut_mid_event": _once(SSE_HEAD + b"data: " + TOKEN + b"\n\ndata: " + ERROR_BYTES),
    "sse_stalls_after_tokens": _once(SSE_HEAD + b"data: " + TOKEN + b"\n\n", hold=True),
    "silent": _once(b"", hold=True),
    # a correct answer after a silent pause: hung to a client that sees only bytes,
    # fine to one that also sees the server computing (see workload.post's progress)
    "slow_503": Behaviour(
        ((b"", 1.5), (_json_head("503 Service Unavailable", len(ERROR_BYTES)) + ERROR_BYTES, 0.0))
    ),
}


class AdversarialServer:
    """Answers every connection with the current behaviour; ``behaviour`` may be changed."""

    def __init__(self, behaviour: str = "graceful_503") -> None:
        self.behaviour = behaviour
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        behaviour = BEHAVIOURS[self.behaviour]
        conn.settimeout(2.0)
        try:
            conn.recv(65536)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for data, pause in behaviour.writes:
                if data:
                    conn.sendall(data)
                if pause:
                    self._stop.wait(pause)
        except OSError:
            pass
        if behaviour.hold:
            self._held.append(conn)
        else:
            conn.close()

    def start(self) -> AdversarialServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        for conn in self._held:
            conn.close()
        self._listener.close()


@contextmanager
def adversarial_server(behaviour: str = "graceful_503") -> Iterator[AdversarialServer]:
    server = AdversarialServer(behaviour).start()
    try:
        yield server
    finally:
        server.stop()
