"""A downstream project's OOM test, run against the project's own server command.

``serve()`` below stands for your server (it sits in this file only so that the example
runs as is): it loads the model with ``mlx_lm.load``, generates with
``mlx_lm.stream_generate``, keeps mlx-lm's ``LRUPromptCache`` and never imports
``mlx_lm.server``. metaloom switches its runtime on in the process that loads the model.
"""

import sys

from pytest_metaloom.fixtures import mlx_server_fixture
from pytest_metaloom.judge import oracle, workload

own_server = mlx_server_fixture(
    command=["{python}", __file__, "--serve", "{model}", "{port}"], name="own-server"
)


def test_own_server_answers_503_and_resets_cache(own_server):
    probe = workload.single_turn("the same prompt before and after the fault")
    workload.chat(own_server.url, probe, max_tokens=1, deadline=10)
    warm = workload.chat(own_server.url, probe, max_tokens=1, deadline=10)
    events_before = len(own_server.events())

    # the id goes in the header and in the prompt: a server without mlx_lm.server's
    # hooks is matched to the request through its prompt
    request_id = workload.new_request_id("oom")
    own_server.arm(f"1*resource_limit@site=decode,request={request_id}")
    affected = workload.chat(
        own_server.url,
        workload.single_turn(f"hello ({request_id})"),
        request_id=request_id,
        deadline=10,
    )
    fired = [e for e in own_server.events(events_before) if e["event"] == "fired"]
    own_server.disarm()
    again = workload.chat(own_server.url, probe, max_tokens=1, deadline=10)
    # the server-side cache witness: metaloom follows mlx-lm's LRUPromptCache in any server;
    # the fewest cached sequences any event showed after the fault
    events = own_server.events(events_before)
    cache_counts = [e["cache"]["sequences"] for e in events if e.get("cache")]

    outcome = oracle.classify(
        oracle.Facts(
            fault="resource_limit",
            fired=bool(fired),
            alive=own_server.is_alive(),
            pid_before=own_server.pid,
            pid_after=own_server.pid,
            health_after_recovery=workload.health(own_server.url),
            recovery_statuses=[again.status],
            recovery_ok=again.ok,
            cache_sequences_after=min(cache_counts, default=None),
            cached_tokens_before=warm.cached_tokens,
            cached_tokens_after=again.cached_tokens,
            **oracle.request_facts(affected),
        )
    )
    oracle.assert_graceful(outcome, own_server.log_tail(20))
    assert fired[0]["pid"] == own_server.pid  # it fired inside the server's own process


def serve(model_path: str, port: str) -> None:
    """The project's server: 503 and an empty prompt cache after an MLX memory error."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

    model, tokenizer = load(model_path)
    prompt_cache, lock = LRUPromptCache(max_size=4), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.reply(200, {"status": "ok"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
            try:
                with lock:
                    kv, rest = prompt_cache.fetch_nearest_cache("model", prompt)
                    if kv is None:
                        kv, rest = make_prompt_cache(model), prompt
                    limit = body.get("max_tokens", 8)
                    steps = stream_generate(model, tokenizer, rest, limit, prompt_cache=kv)
                    out = [step.token for step in steps]
                    prompt_cache.insert_cache("model", prompt + out, kv)
            except RuntimeError as exc:  # MLX raises its memory errors as RuntimeError
                with lock:
                    prompt_cache.trim_to(n_sequences=0)
                mx.clear_cache()
                error = {"message": str(exc), "type": "server_overloaded"}
                return self.reply(503, {"error": error})
            message = {"role": "assistant", "content": tokenizer.decode(out)}
            cached = {"cached_tokens": len(prompt) - len(rest)}
            usage = {"prompt_tokens": len(prompt), "prompt_tokens_details": cached}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self.reply(200, {"choices": [choice], "usage": usage})

        def reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2], sys.argv[3])
