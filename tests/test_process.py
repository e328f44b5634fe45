"""ServerProcess against the real mlx_lm.server and against stand-ins for bad behaviour."""

from __future__ import annotations

import socket

import psutil
import pytest
from support import alive, fake_server_cmd

from pytest_metaloom.server import ports
from pytest_metaloom.server.process import (
    ExternalServer,
    ServerCommandNotFound,
    ServerError,
    ServerNotReachable,
    ServerProcess,
    ServerStartError,
    http_request,
)


def test_real_server_starts_ready_and_stops(model_dir, tmp_path):
    server = ServerProcess(model=model_dir, log_dir=tmp_path)
    with server:
        assert server.is_alive()
        status, body = http_request(server.url + "/health")
        assert status == 200 and b"ok" in body
        status, _ = http_request(
            server.url + "/v1/chat/completions",
            "POST",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=30,
        )
        assert status == 200
        pid, port = server.pid, server.port
        assert "Starting httpd" in server.log_text()
        server.restart()
        assert server.port == port and server.pid != pid
        assert alive([pid]) == []
    assert not server.is_alive()
    assert server.returncode == -15 and server.signal == "SIGTERM"


def test_child_exit_during_start_fails_fast_with_code_and_log(tmp_path):
    server = ServerProcess(command=fake_server_cmd("--exit-at-start", "3"), log_dir=tmp_path)
    with pytest.raises(ServerStartError) as info:
        server.start()
    # it failed because the child exited, not because a start-up timeout ran out
    assert "exited during live" in str(info.value) and "did not become" not in str(info.value)
    assert info.value.returncode == 3
    assert "exit code 3" in str(info.value)
    assert "failing at start on purpose" in str(info.value)


def test_child_killed_by_signal_during_start_names_the_signal(tmp_path):
    server = ServerProcess(command=fake_server_cmd("--abort-at-start"), log_dir=tmp_path)
    with pytest.raises(ServerStartError, match="SIGABRT") as info:
        server.start()
    assert info.value.returncode == -6


def test_never_ready_is_bounded_and_leaves_nothing(tmp_path):
    pid_file = tmp_path / "pids"
    server = ServerProcess(
        command=fake_server_cmd("--never-ready", "--pid-file", str(pid_file)),
        log_dir=tmp_path,
        ready_timeout=2,
    )
    with pytest.raises(ServerStartError, match="did not become ready within 2s"):
        server.start()
    assert alive([int(p) for p in pid_file.read_text().split()]) == []


def test_missing_command_is_a_clear_error(tmp_path):
    with pytest.raises(ServerCommandNotFound, match="not found on PATH"):
        ServerProcess(command=["no-such-server-binary"], log_dir=tmp_path).start()


def test_missing_model_and_model_without_config(tmp_path):
    with pytest.raises(ServerError, match="does not exist"):
        ServerProcess(model=tmp_path / "nope", log_dir=tmp_path).start()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServerError, match="no config.json"):
        ServerProcess(model=tmp_path / "empty", log_dir=tmp_path).start()


def test_port_taken_by_something_else(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        server = ServerProcess(command=fake_server_cmd(), port=taken, log_dir=tmp_path)
        with pytest.raises(ports.PortInUseError, match=f"port {taken}"):
            server.start()


def test_url_where_nothing_listens():
    port = ports.claim_free_port()
    try:
        with pytest.raises(ServerNotReachable, match="nothing answers"):
            ExternalServer(f"http://127.0.0.1:{port}", timeout=2).start()
    finally:
        ports.release_port(port)


def test_server_that_ignores_sigterm_is_killed(tmp_path):
    server = ServerProcess(
        command=fake_server_cmd("--ignore-sigterm"), log_dir=tmp_path, stop_timeout=1
    )
    server.start()
    pid = server.pid
    server.stop()
    assert server.signal == "SIGKILL"
    assert alive([pid]) == []


def test_children_in_other_sessions_are_stopped_too(tmp_path):
    pid_file = tmp_path / "pids"
    server = ServerProcess(
        command=fake_server_cmd("--spawn-child", "--pid-file", str(pid_file)),
        log_dir=tmp_path,
        stop_timeout=1,
    )
    server.start()
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and psutil.Process(pids[1]).ppid() == pids[0]
    server.stop()
    assert alive(pids) == []


def test_ports_are_claimed_exclusively():
    first = ports.claim_free_port()
    try:
        with pytest.raises(ports.PortInUseError):
            ports.claim_port(first)
    finally:
        ports.release_port(first)


@pytest.fixture
def claims(tmp_path, monkeypatch):
    """A private claim directory, so the test sees only its own claims."""
    directory = tmp_path / "claims"
    monkeypatch.setenv("METALOOM_PORT_DIR", str(directory))
    return directory


def test_ports_come_from_outside_the_ephemeral_range_and_leave_nothing(claims):
    low, high = ports.port_range()
    eph_low, eph_high = ports.ephemeral_range()
    assert high < eph_low or low > eph_high
    taken = [ports.claim_free_port() for _ in range(20)]
    assert len(set(taken)) == 20
    assert all(low <= port <= high for port in taken)
    assert sorted(int(p.stem) for p in claims.iterdir()) == sorted(taken)
    for port in taken:
        ports.release_port(port)
    assert not claims.exists(), "the emptied claim directory stays behind"


@pytest.mark.parametrize(
    ("ephemeral", "expected"),
    [
        ((32768, 60999), (20000, 32767)),  # Linux's default
        ((49152, 65535), (20000, 32767)),  # macOS
        ((15000, 60999), (10000, 14999)),  # room only below
        ((1024, 60000), (60001, 65535)),  # room only above
    ],
)
def test_port_range_moves_clear_of_the_ephemeral_range(monkeypatch, ephemeral, expected):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: ephemeral)
    assert ports.port_range() == expected


def test_no_room_outside_the_ephemeral_range_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    with pytest.raises(RuntimeError, match="ip_local_port_range"):
        ports.port_range()


def test_claims_of_dead_processes_are_taken_over_and_swept(claims):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    port = ports.claim_free_port()
    stale = ports.claim_free_port()
    (claims / f"{stale}.lock").write_text(dead.stdout.strip())  # its owner is gone
    assert ports.claim_port(stale) == stale  # taken over
    (claims / "4242.lock").write_text(dead.stdout.strip())
    ports.release_port(stale)
    ports.release_port(port)
    assert not claims.exists(), "stale claims were not swept"


def test_a_server_that_loses_its_port_starts_again_on_another(tmp_path, claims, monkeypatch):
    """EADDRINUSE at the server's own bind (something outside the claims took the port)."""
    real_claim = ports.claim_free_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed_out = iter([taken])
        monkeypatch.setattr(
            ports, "claim_free_port", lambda host: next(handed_out, None) or real_claim(host)
        )
        server = ServerProcess(command=fake_server_cmd(), log_dir=tmp_path, warmup=False)
        try:
            server.start()
            assert server.is_alive() and server.port != taken
            assert server.starts == 2
            assert "Address already in use" in (tmp_path / "mlx-server.1.log").read_text()
        finally:
            server.stop()


def test_tidy_sweeps_dead_claims_and_the_empty_directory(claims):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    mine = ports.claim_free_port()
    (claims / "4243.lock").write_text(dead.stdout.strip())
    ports.tidy()
    assert sorted(p.name for p in claims.iterdir()) == [f"{mine}.lock"]  # a live claim stays
    ports.release_port(mine)
    ports.tidy()
    assert not claims.exists()
