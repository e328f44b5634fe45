"""Client side of a scenario: send requests and record, byte-honestly, what came back.

The server's access log prints 200 even when the client got nothing, so the client is
the only witness that counts. Responses are framed by ``h11`` (a maintained HTTP/1.1
parser: chunked bodies, Content-Length, read-until-close, malformed framing) while this
module keeps the socket, so it still sees which bytes arrived and when: "no status
line", "stream cut before [DONE]", "no byte for the stall bound" and "not valid HTTP"
stay distinct facts. Server-sent events are parsed per the WHATWG specification.
"""

from __future__ import annotations

import codecs
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11

REQUEST_ID_HEADER = "X-Metaloom-Request-Id"
DEFAULT_DEADLINE = 20.0
_READ = 65536


@dataclass
class SseEvent:
    """One dispatched server-sent event (``event`` defaults to ``message``)."""

    data: str
    event: str = "message"
    comments_before: int = 0  # comment lines seen since the previous event

    def payload(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class SseParser:
    """Incremental ``text/event-stream`` parser following the WHATWG rules.

    Lines end in CRLF, LF or CR; a line starting with ``:`` is a comment; ``field:value``
    drops one leading space from the value; ``data`` lines of one event are joined with
    newlines; a blank line dispatches; an event without a final blank line is not
    dispatched (the stream was cut inside it).
    """

    def __init__(self) -> None:
        self.events: list[SseEvent] = []
        self.comments = 0
        self._text = ""
        self._data: list[str] = []
        self._event = ""
        self._comments_since = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, chunk: bytes) -> None:
        self._text += self._decoder.decode(chunk)
        while True:
            index = _line_end(self._text)
            if index is None:
                return
            end, width = index
            line, self._text = self._text[:end], self._text[end + width :]
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments += 1
            self._comments_since += 1
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # id and retry carry nothing a verdict needs; unknown fields are ignored (spec)

    def _dispatch(self) -> None:
        if self._data:
            self.events.append(
                SseEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    comments_before=self._comments_since,
                )
            )
            self._comments_since = 0
        self._data = []
        self._event = ""


def _line_end(text: str) -> tuple[int, int] | None:
    """Where the first line ends and how wide its terminator is (CRLF, LF or CR)."""
    for index, char in enumerate(text):
        if char == "\n":
            return index, 1
        if char == "\r":
            if index + 1 == len(text):
                return None  # a CR at the end may be the first half of CRLF: wait
            return index, 2 if text[index + 1] == "\n" else 1
    return None


@dataclass
class Observation:
    """Everything the client saw for one request."""

    request_id: str
    stream: bool
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sse_data: list[str] = field(default_factory=list)
    sse_events: list[dict[str, Any]] = field(default_factory=list)
    sse_comments: int = 0
    done: bool = False
    complete: bool = False  # the HTTP message ended where its framing says it ends
    ttfb: float | None = None
    elapsed: float = 0.0
    timed_out: bool = False
    stalled: bool = False  # no byte for the stall bound (a subset of timed_out)
    connection_error: str | None = None
    protocol_error: str | None = None
    stopped: bool = False  # the client ended the read on purpose (see ``Tap``)

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

    def _payloads(self) -> list[Any]:
        out = []
        for data in self.sse_data:
            try:
                out.append(json.loads(data))
            except ValueError:
                out.append(None)
        return out

    @property
    def error_index(self) -> int | None:
        """Index (in ``sse_events``) of the first event that reports an error."""
        for index, event in enumerate(self.sse_events):
            payload = _loads(event["data"])
            if event["event"] == "error" or (isinstance(payload, dict) and "error" in payload):
                return index
        return None

    @property
    def error_event(self) -> dict | None:
        """The payload of the first SSE error event, if any (``{}`` if it is not JSON)."""
        index = self.error_index
        if index is None:
            return None
        payload = _loads(self.sse_events[index]["data"])
        return payload if isinstance(payload, dict) else {}

    @property
    def done_after_error(self) -> bool:
        """[DONE] came after the error event (the order a client can rely on)."""
        index = self.error_index
        if index is None or not self.done:
            return False
        return any(e["data"] == "[DONE]" for e in self.sse_events[index + 1 :])

    @property
    def token_events(self) -> int:
        """SSE events that carried generated output (not the error, not [DONE])."""
        return sum(1 for p in self._payloads() if isinstance(p, dict) and "choices" in p)

    @property
    def started_before_error(self) -> bool:
        """Stream events or keep-alive comments reached the client before any error."""
        if not self.stream:
            return False
        index = self.error_index
        before = self.sse_events if index is None else self.sse_events[:index]
        comments = sum(e["comments_before"] for e in before)
        if index is not None:
            comments += self.sse_events[index]["comments_before"]
        elif not self.sse_events:
            comments = self.sse_comments
        return bool(before) or comments > 0

    @property
    def usage(self) -> dict | None:
        if self.stream:
            for payload in reversed(self._payloads()):
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
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def ok(self) -> bool:
        """A complete, successful completion: 200, whole, and a completion (not an error)."""
        if self.status != 200 or not self.complete or self.timed_out:
            return False
        if self.stream:
            return self.done and self.error_index is None
        payload = self.json
        return isinstance(payload, dict) and "choices" in payload and "error" not in payload

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["body"] = self.body[:500].decode(errors="replace")
        data["sse_data"] = self.sse_data[-5:]
        data["sse_events"] = self.sse_events[-5:]
        data["error_event"] = self.error_event
        data["cached_tokens"] = self.cached_tokens
        return data


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


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


class Tap:
    """A live view of one streaming answer, shared with the thread that reads it.

    The reader publishes each server-sent event as it arrives; another thread waits on
    what it needs (``wait``) and may end the read on purpose (``end``): the observation
    then says ``stopped`` (the stream was still being served) or, after ``end(stalled=
    True)``, ``timed_out`` (no progress the caller was waiting for).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: list[SseEvent] = []
        self.closed = False  # the read is over (answer complete, cut, or ended)
        self.ended = threading.Event()
        self.stalled = False

    @property
    def events(self) -> list[SseEvent]:
        with self._cond:
            return list(self._events)

    def publish(self, events: Sequence[SseEvent]) -> None:
        with self._cond:
            if len(events) != len(self._events):
                self._events = list(events)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[SseEvent]], bool], timeout: float) -> bool:
        """Until ``predicate(events)`` holds or the read is over; False when neither came
        within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.closed or predicate(self._events), timeout=max(0.0, timeout)
            )

    def end(self, *, stalled: bool = False) -> None:
        self.stalled = stalled
        self.ended.set()


def token_event(event: SseEvent) -> bool:
    """An event that carried generated output (not an error, not ``[DONE]``)."""
    payload = event.payload()
    return isinstance(payload, dict) and "choices" in payload and "error" not in payload


def error_sse(event: SseEvent) -> bool:
    payload = event.payload()
    return event.event == "error" or (isinstance(payload, dict) and "error" in payload)


class Endpoint(Protocol):
    """A server to talk to: its base URL and the fields it wants in every request body
    (a server profile's request shape: vllm-mlx, for one, refuses a completion that does
    not name its model). :class:`~pytest_metaloom.server.live.LiveServer` is one."""

    url: str
    request_fields: Mapping[str, Any]


Target = str | Endpoint


def resolve_target(target: Target) -> tuple[str, dict[str, Any]]:
    """A plain URL carries no request fields; a server object carries its own."""
    if isinstance(target, str):
        return target.rstrip("/"), {}
    return str(target.url).rstrip("/"), dict(getattr(target, "request_fields", None) or {})


def post(
    target: Target,
    body: dict[str, Any],
    *,
    request_id: str | None = None,
    path: str = "/v1/chat/completions",
    deadline: float = DEFAULT_DEADLINE,
    stall: float | None = None,
    progress: Callable[[], float] | None = None,
    progress_step: float = 0.05,
    tap: Tap | None = None,
) -> Observation:
    """POST one request and read the answer to its end, a cut, the deadline or a stall.

    ``deadline`` bounds the whole exchange; ``stall`` (default: the deadline) bounds the
    time without progress, so a server that stopped working is seen as hung after
    ``stall`` seconds, however long the deadline. Progress is a new byte or, when
    ``progress`` is given (e.g. the server's CPU seconds), that counter growing by
    ``progress_step``: a long prefill sends nothing for seconds but is not hung. A ``tap``
    sees the stream's events as they arrive and can end the read (see :class:`Tap`).
    """
    base_url, fields = resolve_target(target)
    body = {**fields, **body}
    parts = urlsplit(base_url)
    request_id = request_id or new_request_id()
    obs = Observation(request_id=request_id, stream=bool(body.get("stream")))
    payload = json.dumps(body).encode()
    host = f"{parts.hostname}:{parts.port}"
    conn = h11.Connection(our_role=h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=path,
        headers=[
            ("Host", host),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            (REQUEST_ID_HEADER, request_id),
            ("Connection", "close"),
        ],
    )
    wire = conn.send(request) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
    stall = deadline if stall is None else min(stall, deadline)
    started = time.monotonic()
    end = started + deadline
    last_progress = started
    watch = _Progress(progress, progress_step)
    body_bytes = bytearray()
    sse = SseParser()
    try:
        with socket.create_connection(
            (parts.hostname, parts.port), timeout=max(0.05, min(5.0, deadline))
        ) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(wire)
            last_progress = time.monotonic()
            finished = False
            while not finished:
                now = time.monotonic()
                if tap is not None and tap.ended.is_set():
                    obs.timed_out = obs.stalled = tap.stalled
                    obs.stopped = not tap.stalled
                    break
                if now >= end:
                    obs.timed_out = True
                    break
                if watch.moved():
                    last_progress = now
                if now - last_progress >= stall:
                    obs.timed_out = obs.stalled = True
                    break
                wait = min(end - now, last_progress + stall - now, watch.interval)
                if tap is not None:
                    wait = min(wait, 0.05)  # see an ``end`` soon
                sock.settimeout(max(0.01, wait))
                try:
                    chunk = sock.recv(_READ)
                except TimeoutError:
                    continue
                if chunk and obs.ttfb is None:
                    obs.ttfb = time.monotonic() - started
                if chunk:
                    last_progress = time.monotonic()
                conn.receive_data(chunk)
                finished = _drain(conn, obs, body_bytes, sse) or not chunk
                if tap is not None:
                    tap.publish(sse.events)
    except h11.RemoteProtocolError as exc:
        obs.protocol_error = str(exc) or exc.__class__.__name__
    except OSError as exc:
        obs.connection_error = f"{exc.__class__.__name__}: {exc}"
    finally:
        if tap is not None:
            tap.close()
    obs.elapsed = time.monotonic() - started
    obs.body = bytes(body_bytes)
    if obs.stream:
        obs.sse_events = [asdict(e) for e in sse.events]
        obs.sse_comments = sse.comments
        obs.sse_data = [e.data for e in sse.events if e.data != "[DONE]"]
        obs.done = any(e.data == "[DONE]" for e in sse.events)
    return obs


class _Progress:
    """Samples a progress counter (at most every ``interval`` s); ``moved`` says it grew."""

    def __init__(self, counter: Callable[[], float] | None, step: float) -> None:
        self.counter = counter
        self.step = step
        self.interval = 0.25 if counter is not None else 1.0
        self._base = self._read()
        self._next = time.monotonic() + self.interval

    def _read(self) -> float | None:
        if self.counter is None:
            return None
        try:
            return self.counter()
        except Exception:  # the process is gone: no more progress
            return None

    def moved(self) -> bool:
        if self.counter is None or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.interval
        value = self._read()
        if value is None or self._base is None:
            self._base = value
            return False
        if value - self._base >= self.step:
            self._base = value
            return True
        return False


def _drain(conn: h11.Connection, obs: Observation, body: bytearray, sse: SseParser) -> bool:
    """Pull every event h11 can frame from what arrived; True once the answer is over."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return False
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            obs.status = event.status_code
            obs.headers = {k.decode().lower(): v.decode(errors="replace") for k, v in event.headers}
            obs.stream = "text/event-stream" in obs.headers.get("content-type", "")
        elif isinstance(event, h11.Data):
            body += event.data
            if obs.stream:
                sse.feed(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            obs.complete = True
            return True
        elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return True


def chat(
    target: Target,
    messages: Sequence[dict],
    *,
    request_id: str | None = None,
    deadline: float = DEFAULT_DEADLINE,
    stall: float | None = None,
    progress: Callable[[], float] | None = None,
    tap: Tap | None = None,
    **body_args: Any,
) -> Observation:
    """Send one chat completion (see :func:`chat_body` for the body arguments).

    ``target`` is a base URL or a server object (its ``url`` and ``request_fields``)."""
    return post(
        target,
        chat_body(messages, **body_args),
        request_id=request_id,
        deadline=deadline,
        stall=stall,
        progress=progress,
        tap=tap,
    )


def health(base_url: str, *, timeout: float = 5.0) -> int | None:
    """Status of ``/health``, or None when nothing answers within ``timeout``."""
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
