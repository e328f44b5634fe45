"""The graceful-oom patch set against a REAL ``mlx_lm.server`` (tiny model, real HTTP).

The server runs from the patch overlay (checked below). Faults come from a STAND-IN for
the project injector, written by this test into a ``sitecustomize.py``: it wraps
``mx.eval`` / ``mx.async_eval`` and raises the exact MLX error text once, when armed
through a file. It stands in for the Metal failures, which cannot happen on this
machine. Switch it to ``pytest_metaloom.injector`` once that is committed.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_metaloom import faults
from pytest_metaloom.patchset import build_overlay, load_patch_set, server_env
from pytest_metaloom.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
GRACEFUL = REPO / "patchsets" / "graceful-oom"
HTTP_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(300)

STANDIN_SITECUSTOMIZE = '''\
"""STAND-IN for the metaloom injector: raise one exact MLX error text from mx.eval.

Armed by writing {"text": ..., "skip": N} to $STANDIN_ARM; the (N+1)-th evaluation after
arming raises RuntimeError(text) and appends the text to $STANDIN_FIRED.
"""
import json
import os

_ARM = os.environ.get("STANDIN_ARM")
_FIRED = os.environ.get("STANDIN_FIRED")

if _ARM and _FIRED:
    import mlx.core as mx

    _state = {"text": None, "skip": 0}

    def _maybe_raise():
        if os.path.exists(_ARM):
            with open(_ARM) as f:
                spec = json.load(f)
            os.unlink(_ARM)
            _state.update(text=spec["text"], skip=spec["skip"])
        if _state["text"] is None:
            return
        if _state["skip"] > 0:
            _state["skip"] -= 1
            return
        text, _state["text"] = _state["text"], None
        with open(_FIRED, "a") as f:
            f.write(json.dumps(text) + "\\n")
        raise RuntimeError(text)

    def _wrap(real):
        def wrapper(*args, **kwargs):
            _maybe_raise()
            return real(*args, **kwargs)

        return wrapper

    mx.eval = _wrap(mx.eval)
    mx.async_eval = _wrap(mx.async_eval)
'''


class Patched:
    """The running patched server plus the stand-in's arm/fired files."""

    def __init__(self, server: ServerProcess, arm_path: Path, fired_path: Path, env: dict):
        self.server = server
        self.arm_path = arm_path
        self.fired_path = fired_path
        self.env = env

    def arm(self, text: str, skip: int = 0) -> None:
        tmp = self.arm_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"text": text, "skip": skip}))
        os.rename(tmp, self.arm_path)

    def fired(self) -> list[str]:
        if not self.fired_path.exists():
            return []
        return [json.loads(line) for line in self.fired_path.read_text().splitlines()]

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=HTTP_TIMEOUT)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, payload, headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def complete(self, prompt: str, **extra: Any) -> tuple[int, bytes]:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0, **extra}
        return self.request("POST", "/v1/completions", body)


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Patched]:
    root = tmp_path_factory.mktemp("graceful-live")
    overlay = build_overlay(load_patch_set(GRACEFUL), root / "overlays")
    assert overlay is not None
    standin = root / "standin"
    standin.mkdir()
    (standin / "sitecustomize.py").write_text(STANDIN_SITECUSTOMIZE)
    env = server_env(overlay)
    env["PYTHONPATH"] += os.pathsep + str(standin)
    env["STANDIN_ARM"] = str(root / "arm.json")
    env["STANDIN_FIRED"] = str(root / "fired.jsonl")
    server = ServerProcess(model=model_dir, env=env, log_dir=root / "logs", name="graceful")
    try:
        server.start()
        yield Patched(server, root / "arm.json", root / "fired.jsonl", env)
    finally:
        server.stop()


def _usage_cached(raw: bytes) -> int:
    return json.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"]


def _warm(patched: Patched, prompt: str, **extra: Any) -> None:
    """Two requests: the second must report cached prompt tokens (the cache is warm)."""
    for _ in range(2):
        status, raw = patched.complete(prompt, **extra)
        assert status == 200, raw
    assert _usage_cached(raw) > 0


def _assert_alive_and_cold(patched: Patched, prompt: str, **extra: Any) -> None:
    status, raw = patched.complete(prompt, **extra)
    assert status == 200, raw
    assert _usage_cached(raw) == 0, "prompt cache was not reset after the OOM"
    assert patched.request("GET", "/health")[0] == 200
    assert patched.server.is_alive()


def _sse_events(raw: bytes) -> list[str]:
    return [
        line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")
    ]


def _wait_for_log(patched: Patched, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in patched.server.log_text():
            return True
        time.sleep(0.05)
    return False


def test_the_overlay_is_what_the_server_imports(patched: Patched) -> None:
    env = {**os.environ, **patched.env}
    out = subprocess.run(
        [sys.executable, "-c", "import mlx_lm.server as s; print(s.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert out.startswith(patched.env["PYTHONPATH"].split(os.pathsep)[0])


OOM_CASES = [
    ("alloc_too_large", "sync"),
    ("resource_limit", "sync"),
    ("unable_to_allocate", "sync"),
    ("cmdbuf_oom", "deferred"),
    ("cmdbuf_oom", "abort"),  # the abort wording, raised as an exception
    ("gpu_timeout", "deferred"),
    ("gpu_hang", "deferred"),
    ("gpu_victim", "deferred"),
    ("invalid_resource", "deferred"),
]


@pytest.mark.parametrize("path", ["batched", "sequential"])
@pytest.mark.parametrize(("kind", "semantics"), OOM_CASES)
def test_oom_answers_503_resets_cache_and_keeps_serving(
    patched: Patched, kind: str, semantics: str, path: str
) -> None:
    extra = {"seed": 1} if path == "sequential" else {}
    prompt = f"{kind} {semantics} {path} " * 12
    _warm(patched, prompt, **extra)
    text = faults.message(kind, semantics)
    patched.arm(text)
    status, raw = patched.complete(prompt, **extra)
    assert patched.fired() and patched.fired()[-1] == text, "the stand-in fault did not fire"
    assert status == 503, raw
    error = json.loads(raw)["error"]
    assert error == {"message": text, "type": "server_overloaded", "code": kind}
    assert _wait_for_log(patched, f"GPU memory failure ({kind}): prompt cache reset")
    _assert_alive_and_cold(patched, prompt, **extra)


@pytest.mark.parametrize("path", ["batched", "sequential"])
def test_runtime_error_answers_500_and_keeps_the_cache(patched: Patched, path: str) -> None:
    extra = {"seed": 1} if path == "sequential" else {}
    prompt = f"control case {path} " * 12
    _warm(patched, prompt, **extra)
    patched.arm("something else broke")
    status, raw = patched.complete(prompt, **extra)
    assert status == 500, raw
    assert json.loads(raw)["error"] == {
        "message": "something else broke",
        "type": "server_error",
        "code": "internal_error",
    }
    status, raw = patched.complete(prompt, **extra)
    assert status == 200 and _usage_cached(raw) > 0  # not an OOM: no reset
    assert patched.request("GET", "/health")[0] == 200


@pytest.mark.parametrize("path", ["batched", "sequential"])
def test_stream_failing_before_the_first_token_gets_503(patched: Patched, path: str) -> None:
    extra = {"seed": 1} if path == "sequential" else {}
    prompt = f"stream early {path} " * 12
    _warm(patched, prompt, **extra)
    text = faults.message("cmdbuf_oom", "deferred")
    patched.arm(text)
    status, raw = patched.complete(prompt, stream=True, **extra)
    assert status == 503, raw
    assert json.loads(raw)["error"]["code"] == "cmdbuf_oom"
    _assert_alive_and_cold(patched, prompt, **extra)


@pytest.mark.parametrize("path", ["batched", "sequential"])
def test_stream_failing_after_tokens_ends_with_error_event_and_done(
    patched: Patched, path: str
) -> None:
    extra = {"seed": 1} if path == "sequential" else {}
    # A prompt the tiny model answers with visible text (runs of spaces are held back by
    # the detokenizer and would arrive as one chunk at the end).
    prompt = f"the quick brown fox, stream late {path}"
    _warm(patched, prompt, **extra)
    # Premise: without a fault this prompt streams many chunks, so the fault lands mid-stream.
    status, raw = patched.complete(prompt, stream=True, max_tokens=48, **extra)
    assert status == 200 and len(_sse_events(raw)) >= 24, raw
    text = faults.message("resource_limit", "sync")
    patched.arm(text, skip=12)
    status, raw = patched.complete(prompt, stream=True, max_tokens=48, **extra)
    assert patched.fired()[-1] == text
    assert status == 200
    events = _sse_events(raw)
    assert events[-1] == "[DONE]", events
    error_events = [e for e in events if '"error"' in e]
    assert len(error_events) == 1 and events[-2] == error_events[0]
    assert json.loads(error_events[0])["error"]["code"] == "resource_limit"
    tokens = [e for e in events[:-2] if json.loads(e).get("choices")]
    assert tokens, f"the fault fired before any token was streamed: {raw!r}"
    _assert_alive_and_cold(patched, prompt, **extra)


def test_health_is_200_and_no_thread_died(patched: Patched) -> None:
    assert patched.request("GET", "/health") == (200, b'{"status": "ok"}')
    assert "generation thread died" not in patched.server.log_text()
