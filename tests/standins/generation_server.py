"""A stand-in downstream MLX server (NOT mlx_lm.server, and it never imports it).

It plays the part of the servers projects build on mlx-lm: it loads the model with
``mlx_lm.load`` and serves with mlx-lm's shared generation code -- ``stream_generate``
(sequential) or ``BatchGenerator`` (``--batched``) -- and keeps mlx-lm's
``LRUPromptCache``. Its OOM handling is the one a careful downstream server would
write: an MLX memory error answers 503 with an OpenAI-style error body, empties the
prompt cache and MLX's buffer cache, and the server keeps serving.

``--model-process`` runs the engine in a child started with multiprocessing's
``spawn`` (as mlx-openai-server does): the front process only relays, so the runtime
must switch on in the child.

``--no-oom-handling`` turns that off (every error is a 500 and the cache is kept), so
a test can show the harness telling the two apart.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OOM_MARKERS = ("out of memory", "insufficient memory", "resource limit")


class Engine:
    """One model; generation is serialized (sequential) or batched by one thread."""

    def __init__(self, model_path: str, batched: bool) -> None:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import LRUPromptCache

        self.mx = mx
        self.model, self.tokenizer = load(model_path)
        self.cache = LRUPromptCache(max_size=8)
        self.lock = threading.Lock()
        self.batched = batched
        self.jobs: queue.Queue[tuple[list[int], int, queue.Queue[Any]]] = queue.Queue()
        if batched:
            threading.Thread(target=self._batch_loop, name="batch", daemon=True).start()

    def prompt(self, body: dict) -> list[int]:
        """Chat messages through the template, or a plain completion prompt."""
        if "messages" not in body:
            return list(self.tokenizer.encode(str(body.get("prompt", ""))))
        return list(
            self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
        )

    def generate(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Generated token ids and the number of prompt tokens served from the cache."""
        if self.batched:
            answer: queue.Queue[Any] = queue.Queue()
            self.jobs.put((tokens, max_tokens, answer))
            result = answer.get(timeout=120)
            if isinstance(result, BaseException):
                raise result
            return result, 0
        from mlx_lm.generate import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        with self.lock:
            cache, rest = self.cache.fetch_nearest_cache("m", tokens)
            cached = len(tokens) - len(rest)
            if cache is None:
                cache, rest, cached = make_prompt_cache(self.model), tokens, 0
            out: list[int] = []
            for gen in stream_generate(
                self.model, self.tokenizer, rest, max_tokens=max_tokens, prompt_cache=cache
            ):
                out.append(gen.token)
                if gen.finish_reason is not None:
                    break
            self.cache.insert_cache("m", tokens + out, cache)
            return out, cached

    def _batch_loop(self) -> None:
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(self.model, max_tokens=64)
        waiting: dict[int, tuple[list[int], queue.Queue[Any]]] = {}
        while True:
            if not waiting:
                job = self.jobs.get()
                self._insert(gen, waiting, job)
            while not self.jobs.empty():
                self._insert(gen, waiting, self.jobs.get())
            try:
                responses = gen.next_generated()
            except Exception as exc:  # the whole batch failed: answer every request
                for _, answer in waiting.values():
                    answer.put(exc)
                waiting.clear()
                gen.close()
                gen = BatchGenerator(self.model, max_tokens=64)  # a fresh batch state
                continue
            for r in responses:
                out, answer = waiting[r.uid]
                out.append(r.token)
                if r.finish_reason is not None:
                    del waiting[r.uid]
                    answer.put(out)

    @staticmethod
    def _insert(gen: Any, waiting: dict, job: tuple[list[int], int, Any]) -> None:
        tokens, max_tokens, answer = job
        (uid,) = gen.insert([tokens], max_tokens=[max_tokens])
        waiting[uid] = ([], answer)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def forget(self) -> None:
        """After a memory error: the prompt cache and MLX's buffer cache go."""
        self.cache.trim_to(n_sequences=0)
        self.mx.clear_cache()


class RemoteEngine:
    """The engine in a spawned model process; this front process never loads a model."""

    def __init__(self, model_path: str, batched: bool) -> None:
        import multiprocessing as mp

        import mlx_lm.generate  # noqa: F401 - a front that imports mlx-lm must stay inert

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_model_process, args=(child, model_path, batched))
        self.proc.daemon = True
        self.proc.start()
        self.lock = threading.Lock()
        if self.conn.recv() != "ready":
            raise RuntimeError("model process failed to start")

    def _ask(self, *request: Any) -> Any:
        with self.lock:
            self.conn.send(request)
            kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(value)
        return value

    def prompt(self, body: dict) -> list[int]:
        return self._ask("prompt", body)

    def generate(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        return self._ask("generate", tokens, max_tokens)

    def decode(self, tokens: list[int]) -> str:
        return self._ask("decode", tokens)

    def forget(self) -> None:
        self._ask("forget")


def _model_process(conn: Any, model_path: str, batched: bool) -> None:
    engine = Engine(model_path, batched)
    conn.send("ready")
    while True:
        op, *args = conn.recv()
        try:
            if op == "decode":
                value: Any = engine.tokenizer.decode(args[0])
            else:
                value = getattr(engine, op)(*args)
            conn.send(("ok", value))
        except Exception as exc:
            conn.send(("error", str(exc)))


def make_handler(engine: Any, handle_oom: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: dict, stream: bool = False) -> None:
            if stream and status == 200:
                body = (
                    f"data: {json.dumps(payload['chunk'])}\n\n"
                    f"data: {json.dumps(payload['final'])}\n\ndata: [DONE]\n\n"
                ).encode()
                ctype = "text/event-stream"
            else:
                body, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            stream = bool(body.get("stream"))
            try:
                tokens = engine.prompt(body)
                out, cached = engine.generate(tokens, int(body.get("max_tokens") or 16))
            except Exception as exc:
                text = str(exc)
                is_oom = any(m in text.lower() for m in OOM_MARKERS)
                if handle_oom and is_oom:
                    engine.forget()
                    error = {"message": text, "type": "server_overloaded", "code": 503}
                    self._send(503, {"error": error})
                else:
                    self._send(500, {"error": {"message": text, "type": "internal_error"}})
                return
            usage = {
                "prompt_tokens": len(tokens),
                "completion_tokens": len(out),
                "total_tokens": len(tokens) + len(out),
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            text = engine.decode(out)
            created = int(time.time())
            if stream:
                delta = {"choices": [{"index": 0, "delta": {"content": text}}], "created": created}
                final = {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": usage,
                }
                self._send(200, {"chunk": delta, "final": final}, stream=True)
                return
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if "messages" in body:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            self._send(200, {"choices": [choice], "usage": usage, "created": created})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batched", action="store_true", help="serve with BatchGenerator")
    parser.add_argument("--model-process", action="store_true", help="spawned model process")
    parser.add_argument("--no-oom-handling", action="store_true")
    args = parser.parse_args()
    make = RemoteEngine if args.model_process else Engine
    engine = make(args.model, args.batched)
    handler = make_handler(engine, handle_oom=not args.no_oom_handling)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
