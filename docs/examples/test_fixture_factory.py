"""Servers on demand: a fault armed at start-up, and a server fixture with its own arguments."""

import time

from pytest_metaloom.fixtures import mlx_server_fixture
from pytest_metaloom.judge import workload

# A module-scoped server that serves every request on the sequential path (--kv-bits).
quantized_server = mlx_server_fixture(scope="module", server_args=["--kv-bits", "8"])


def test_quantized_server_answers(quantized_server):
    answer = workload.chat(quantized_server.url, workload.single_turn("hi"), deadline=10)
    assert answer.ok, answer.summary()


def test_command_buffer_oom_aborts_like_mlx_031(mlx_server_factory):
    # The seed report: an uncaught command-buffer OOM kills the process with SIGABRT.
    server = mlx_server_factory(faults="1*cmdbuf_oom(abort)@request=doomed")
    answer = workload.chat(
        server.url, workload.single_turn("hello"), request_id="doomed", deadline=10
    )
    end = time.monotonic() + 5
    while server.is_alive() and time.monotonic() < end:
        time.sleep(0.05)

    assert answer.status is None  # the in-flight request got no status line
    assert server.returncode == -6  # SIGABRT, as libc++abi's terminate() raises it
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in server.log_text()
