"""Client side of a scenario: send requests and record, byte-honestly, what came back.

The server's access log prints 200 even when the client got nothing, so the client is
the only witness that counts. Requests go over a raw socket so that "no status line",
"stream cut before [DONE]" and "no byte before the deadline" are all told apart.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

REQUEST_ID_HEADER = "X-Metaloom-Request-Id"


@dataclass
class Observation:
    """Everything the client saw for one request."""

    request_id: str
    stream: bool
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sse_data: list[str] = field(default_factory=list)
    done: bool = False
    complete: bool = False
    ttfb: float | None = None
    elapsed: float = 0.0
    timed_out: bool = False
    connection_error: str | None = None

    @property
    def got_bytes(self) -> bool:
        return self.ttfb is not None

    @property
    def json(self) -> Any:
        if self.stream:
            return None
        try:
            return json.loads(self.body.decode())
        except (ValueError, UnicodeDecodeError):
            return None

    @property
    def error_event(self) -> dict | None:
        """The first SSE event that carries an ``error`` object, if any."""
        for data in self.sse_data:
            try:
                payload = json.loads(data)
            except ValueError:
                continue
            if isinstance(payload, dict) and "error" in payload:
                return payload
        return None

    @property
    def token_events(self) -> int:
        """SSE events that carried generated output (not the error, not [DONE])."""
        count = 0
        for data in self.sse_data:
            try:
                payload = json.loads(data)
            except ValueError:
                continue
            if isinstance(payload, dict) and "choices" in payload:
                count += 1
        return count

    @property
    def started_before_error(self) -> bool:
        """Stream bytes (tokens or keep-alive comments) reached the client before any error."""
        if not self.stream or not self.body:
            return False
        marker = self.body.find(b'data: {"error"')
        return marker != 0 and bool(self.body[: marker if marker > 0 else None].strip())

    @property
    def usage(self) -> dict | None:
        if self.stream:
            for data in reversed(self.sse_data):
                try:
                    payload = json.loads(data)
                except ValueError:
                    continue
                if isinstance(payload, dict) and payload.get("usage"):
                    return payload["usage"]
            return None
        payload = self.json
        return payload.get("usage") if isinstance(payload, dict) else None

    @property
    def cached_tokens(self) -> int | None:
        usage = self.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        value = details.get("cached_tokens")
        return int(value) if value is not None else None

    @property
    def ok(self) -> bool:
        """A complete, successful completion."""
        if self.status != 200 or not self.complete:
            return False
        return self.done and self.error_event is None if self.stream else self.json is not None

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["body"] = self.body[:500].decode(errors="replace")
        data["sse_data"] = self.sse_data[-5:]
        data["error_event"] = self.error_event
        data["cached_tokens"] = self.cached_tokens
        return data


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def chat_body(
    messages: Sequence[dict],
    *,
    stream: bool = False,
    max_tokens: int = 8,
    seed: int | None = None,
    tools: Sequence[dict] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if seed is not None:
        body["seed"] = seed
    if tools:
        body["tools"] = list(tools)
    return body


# Fields a server wants in every request body (a server profile's request shape), by base
# URL: vllm-mlx, for one, refuses a completion that does not name its model.
BODY_DEFAULTS: dict[str, dict[str, Any]] = {}


def post(
    base_url: str,
    body: dict[str, Any],
    *,
    request_id: str | None = None,
    path: str = "/v1/chat/completions",
    deadline: float = 20.0,
) -> Observation:
    """POST one request and read the answer to its end, the deadline, or a cut."""
    body = {**BODY_DEFAULTS.get(base_url.rstrip("/"), {}), **body}
    parts = urlsplit(base_url)
    request_id = request_id or new_request_id()
    obs = Observation(request_id=request_id, stream=bool(body.get("stream")))
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\nConnection: close\r\n\r\n"
    ).encode()
    started = time.monotonic()
    end = started + deadline
    raw = bytearray()
    try:
        with socket.create_connection(
            (parts.hostname, parts.port), timeout=min(5.0, deadline)
        ) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(head + payload)
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    obs.timed_out = True
                    break
                sock.settimeout(min(remaining, 1.0))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                if obs.ttfb is None:
                    obs.ttfb = time.monotonic() - started
                raw += chunk
                if _finished(raw, obs.stream):
                    break
    except OSError as exc:
        obs.connection_error = f"{exc.__class__.__name__}: {exc}"
    obs.elapsed = time.monotonic() - started
    _parse(bytes(raw), obs)
    return obs


def _split_head(raw: bytes) -> tuple[bytes, bytes] | None:
    index = raw.find(b"\r\n\r\n")
    if index < 0:
        return None
    return raw[:index], raw[index + 4 :]


def _finished(raw: bytes, stream: bool) -> bool:
    """Stop reading early once a response is whole (a server may keep the socket)."""
    split = _split_head(raw)
    if split is None:
        return False
    head, body = split
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    if length is not None:
        return len(body) >= length
    return stream and b"data: [DONE]" in body


def _parse(raw: bytes, obs: Observation) -> None:
    split = _split_head(raw)
    if split is None:
        obs.body = raw
        return
    head, body = split
    lines = head.decode(errors="replace").split("\r\n")
    status_parts = lines[0].split(" ", 2)
    if len(status_parts) >= 2 and status_parts[0].startswith("HTTP/") and status_parts[1].isdigit():
        obs.status = int(status_parts[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        obs.headers[name.strip().lower()] = value.strip()
    obs.body = body
    content_type = obs.headers.get("content-type", "")
    if "text/event-stream" in content_type:
        obs.stream = True
        for block in body.decode(errors="replace").split("\n\n"):
            for line in block.split("\n"):
                if line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        obs.done = True
                    else:
                        obs.sse_data.append(data)
        obs.complete = obs.done
    else:
        obs.stream = False
        length = obs.headers.get("content-length")
        if length is not None and length.isdigit():
            obs.complete = len(body) >= int(length)
        else:
            obs.complete = obs.status is not None and not obs.timed_out and bool(body)


def chat(
    base_url: str,
    messages: Sequence[dict],
    *,
    request_id: str | None = None,
    deadline: float = 20.0,
    **body_args: Any,
) -> Observation:
    """Send one chat completion (see :func:`chat_body` for the body arguments)."""
    return post(
        base_url, chat_body(messages, **body_args), request_id=request_id, deadline=deadline
    )


def health(base_url: str, *, timeout: float = 5.0) -> int | None:
    """Status of ``/health``, or None when nothing answers."""
    from pytest_metaloom.server.process import http_request

    try:
        status, _ = http_request(base_url + "/health", timeout=timeout)
    except OSError:
        return None
    return status


def concurrently(calls: Iterable[Any], *, timeout: float) -> list[Any]:
    """Run zero-argument callables in threads; results in order, bounded by ``timeout``."""
    calls = list(calls)
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Any) -> None:
        try:
            results[index] = call()
        except Exception as exc:  # a failed bystander is a fact, not a crash
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return results


# -- conversations ---------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "read_document",
        "description": "Read a section of a long document.",
        "parameters": {
            "type": "object",
            "properties": {"section": {"type": "integer"}},
            "required": ["section"],
        },
    },
}


def single_turn(text: str = "Tell me about memory on the GPU.") -> list[dict]:
    return [{"role": "user", "content": text}]


def tool_loop_turn(messages: list[dict], turn: int, *, document_words: int = 120) -> list[dict]:
    """Append one turn of the seed report's tool loop: a tool call and its (long) result.

    Each turn grows the context, and so the prompt cache and active KV, the way a
    multi-turn agent reading a heavy document does.
    """
    words = " ".join(f"w{turn}x{i}" for i in range(document_words))
    return [
        *messages,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": f"call_{turn}",
                    "type": "function",
                    "function": {
                        "name": "read_document",
                        "arguments": json.dumps({"section": turn}),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": f"call_{turn}", "content": f"section {turn}: {words}"},
        {"role": "user", "content": f"Summarise section {turn}."},
    ]


def tool_loop_start() -> list[dict]:
    return [
        {"role": "system", "content": "You read long documents with tools."},
        {"role": "user", "content": "Read the document section by section."},
    ]
