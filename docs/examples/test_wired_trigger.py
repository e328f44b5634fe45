"""The seed report as a test: a tool loop grows the KV cache until it crosses a lowered limit.

The trigger is memory, not a request id: the command-buffer OOM fires on the first
evaluation that would take MLX's active + cache memory past the model plus 1 MiB.
"""

from pytest_metaloom.judge import workload


def test_tool_loop_crosses_lowered_wired_limit(mlx_server):
    mlx_server.arm("1*cmdbuf_oom(deferred)@wired=active+1MiB,path=batched")
    messages = workload.tool_loop_start()
    answers = []
    for turn in range(8):
        messages = workload.tool_loop_turn(messages, turn)
        answer = workload.chat(
            mlx_server.url, messages, tools=[workload.WEATHER_TOOL], max_tokens=4, deadline=10
        )
        answers.append(answer.status)
        if not answer.ok:
            break

    fired = [e for e in mlx_server.events() if e["event"] == "fired"]
    assert fired, f"the limit was never crossed; statuses {answers}"
    assert fired[0]["kind"] == "cmdbuf_oom"
    crossing = fired[0]["crossing"]  # the limit this evaluation would have gone over
    assert crossing["limit"] == "wired" and crossing["value"] > crossing["limit_bytes"]
    # Stock mlx-lm 0.32.2: the batched generation thread died, the process lives on, wedged.
    assert mlx_server.is_alive()
    assert workload.health(mlx_server.url) == 503
