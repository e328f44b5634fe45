"""The first downstream test: a live mlx_lm.server answers, and its prompt cache works."""

from pytest_metaloom.judge import workload


def test_server_answers(mlx_server):
    prompt = workload.single_turn("Is the server up?")
    first = workload.chat(mlx_server.url, prompt, max_tokens=4, deadline=10)
    assert first.ok, first.summary()

    again = workload.chat(mlx_server.url, prompt, max_tokens=4, deadline=10)
    assert again.ok, again.summary()
    # The repeated prompt is served from the prompt cache: a warm server reports it.
    assert again.cached_tokens and again.cached_tokens > 0
    assert workload.health(mlx_server.url) == 200
