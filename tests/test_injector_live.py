"""The injector against a real ``mlx_lm.server`` subprocess (tiny offline model, CPU backend).

One server is shared by the module; a test that aborts or wedges it restarts it.
Only Metal itself is simulated (by the runtime); HTTP, threads, signals are real.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import WAIT_ONLY_LINES, wait_until

from pytest_metaloom.inject.faults import (
    FAULT_KINDS,
    PATHS,
    SITES,
    FaultSpecError,
    abort_line,
    message,
)
from pytest_metaloom.inject.injector import REQUEST_HEADER, Injector, InjectorError, bootstrap_env
from pytest_metaloom.inject.runtime.locate import RULES
from pytest_metaloom.server.process import ServerProcess

pytestmark = pytest.mark.timeout(120)

VERSION = importlib.metadata.version("mlx-lm")
SEQ = {"seed": 1}  # a request with a seed is served by the sequential path


class Live:
    """A shared server plus its injector client; restarts it when a test broke it."""

    def __init__(self, model: Path, run_dir: Path) -> None:
        self.env = bootstrap_env(run_dir)
        self.inj = Injector.from_env(self.env)
        self.srv = ServerProcess(
            model=model, env=self.env, log_dir=run_dir, name="live", ready_timeout=90
        )

    def post(
        self, content: str = "hello there", rid: str | None = None, timeout: float = 20.0, **extra
    ) -> tuple[int | None, Any]:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
        headers = {"Content-Type": "application/json"}
        if rid:
            headers[REQUEST_HEADER] = rid
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=timeout)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return None, exc
        finally:
            conn.close()

    def health(self) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=5)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def ensure_healthy(self) -> None:
        if not self.srv.is_alive() or self.health() != 200:
            self.srv.restart()
        self.inj.disarm()

    def log(self) -> str:
        return self.srv.log_text()

    def mark(self) -> int:
        return len(self.inj.events())


@pytest.fixture(scope="module")
def live(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(model_dir, tmp_path_factory.mktemp("live"))
    try:
        server.srv.start()
        yield server
    finally:
        server.srv.stop()


@pytest.fixture()
def srv(live: Live) -> Live:
    live.ensure_healthy()
    return live


def _by_event(inj: Injector, since: int, name: str) -> list[dict]:
    return [e for e in inj.events(since) if e["event"] == name]


SYNC_OR_DEFERRED = [k for k in FAULT_KINDS if k != "hang"]


@pytest.mark.parametrize("kind", SYNC_OR_DEFERRED)
def test_exact_text_reaches_server_log_sequential(srv: Live, kind: str) -> None:
    """Every kind surfaces as the RuntimeError text real MLX raises; the thread survives."""
    since = srv.mark()
    srv.inj.arm(f"1*{kind}@path=sequential,site=decode")
    status, body = srv.post(rid=f"fid-{kind}", **SEQ)
    assert status is None or b"choices" not in body  # the in-flight request is lost
    fired = srv.inj.wait_for("fired", since=since)
    sem = "deferred" if FAULT_KINDS[kind].family == "command_buffer" else "sync"
    text = message(kind, sem)
    assert fired["kind"] == kind and fired["semantics"] == sem
    assert fired["message"] == text
    assert fired["path"] == "sequential" and fired["site"] == "decode"
    assert wait_until(lambda: f"RuntimeError: {text}\n" in srv.log()), srv.log()
    assert srv.health() == 200
    assert srv.post(**SEQ)[0] == 200


def test_sequential_sync_error_drops_request_but_thread_survives(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("1*resource_limit@path=sequential")
    status, body = srv.post(rid="seq-1", **SEQ)
    assert status != 200 or not body.startswith(b'{"id"'), (status, body)
    fired = srv.inj.wait_for("fired", since=since)
    assert fired["request_ids"] == ["seq-1"]
    assert srv.health() == 200
    ok_status, ok_body = srv.post(rid="seq-2", **SEQ)
    assert ok_status == 200 and b"choices" in ok_body


def test_batched_resource_limit_kills_stock_generation_thread(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("1*resource_limit@site=decode,path=batched")
    status, _ = srv.post(rid="batch-1")
    assert status is None  # no status line: the connection just closes
    fired = srv.inj.wait_for("fired", since=since)
    assert (fired["site"], fired["path"]) == ("decode", "batched")
    assert "[metal::malloc] Resource limit (499000) exceeded." in srv.log()
    assert "generation thread died" in srv.log()
    status, body = srv.post(rid="batch-2")
    assert status == 404 and json.loads(body) == {"error": "generation thread died"}
    assert srv.health() == 503
    assert srv.srv.is_alive()  # wedged, not dead


@pytest.mark.parametrize(
    ("path", "committed_at", "raised_at"),
    [
        # generate_step: mx.async_eval(next_y, ...) commits, mx.eval(y) of the first
        # token syncs
        ("sequential", ("async_eval", "generate.py:472"), ("eval", "generate.py:474")),
        # GenerationBatch._step: mx.async_eval(next tokens) commits, mx.eval(inputs) syncs
        ("batched", ("async_eval", "generate.py:1434"), ("eval", "generate.py:1439")),
    ],
)
def test_deferred_error_is_raised_at_the_next_sync_point_of_the_generation_stream(
    srv: Live, path: str, committed_at: tuple[str, str], raised_at: tuple[str, str]
) -> None:
    """The work committed by an async evaluation fails; the error waits on the stream and
    surfaces at the next synchronisation point there, in the same request (mlx-lm 0.32.2)."""
    if VERSION != "0.32.2":
        pytest.skip("the lines named here are mlx-lm 0.32.2's")
    since = srv.mark()
    rid = f"def-{path}"
    srv.inj.arm(f"1*cmdbuf_oom(deferred)@site=decode,path={path},request={rid}")
    status, body = srv.post(f"deferred {path}", rid=rid, **(SEQ if path == "sequential" else {}))
    assert status != 200 or b"choices" not in body
    fired = srv.inj.wait_for("fired", since=since)
    raised = srv.inj.wait_for("raised", since=since)
    assert (fired["op"], fired["where"].split()[0]) == committed_at
    assert fired["timing"] == "parked" and fired["semantics"] == "deferred"
    assert (raised["op"], raised["where"].split()[0]) == raised_at
    assert raised["stream"] == fired["stream"] and raised["request_ids"] == [rid]
    assert raised["t"] >= fired["t"]
    assert raised["message"].endswith("kIOGPUCommandBufferCallbackErrorOutOfMemory).")
    assert raised["message"] in srv.log()
    if path == "sequential":  # cleared once raised: the thread goes on serving
        assert srv.health() == 200 and srv.post(**SEQ)[0] == 200


@pytest.mark.parametrize(("site", "path"), [(s, p) for s in SITES for p in PATHS])
def test_each_site_fires_at_the_mlx_lm_evaluation_it_stands_for(
    srv: Live, site: str, path: str
) -> None:
    since = srv.mark()
    rid = f"site-{site}-{path}-{time.monotonic_ns()}"
    srv.inj.arm(f"1*runtime_error@site={site},path={path},request={rid}")
    extra = SEQ if path == "sequential" else {}
    srv.post(f"a fresh prompt for {rid}", rid=rid, **extra)
    fired = srv.inj.wait_for("fired", since=since)
    assert (fired["site"], fired["path"], fired["timing"]) == (site, path, "instead")
    assert fired["op"] in ("eval", "async_eval", "item", "tolist")
    lines = {w for r in RULES if r.site == site for v, w in r.stands_for if v == VERSION}
    assert fired["where"].split()[0] in lines, fired["where"]


@pytest.mark.parametrize("kind", ["cmdbuf_oom", "gpu_timeout"])
def test_abort_kills_with_sigabrt_and_libcxxabi_line(srv: Live, kind: str) -> None:
    since = srv.mark()
    srv.inj.arm(f"1*{kind}(abort)@site=decode")
    status, _ = srv.post(rid="abort-1")
    assert status is None
    wait_until(lambda: not srv.srv.is_alive())
    assert srv.srv.returncode == -6
    assert abort_line(message(kind, "abort")) + "\n" in srv.log()
    fired = srv.inj.wait_for("fired", since=since, timeout=1)
    dying = srv.inj.wait_for("dying", since=since, timeout=1)
    assert fired["semantics"] == "abort" and fired["timing"] == "abort"
    assert fired["commit_t"] <= fired["death_due_t"] <= dying["death_t"]
    assert dying["commit_t"] == fired["commit_t"]


def test_lowered_wired_limit_fires_only_after_real_growth(srv: Live) -> None:
    since = srv.mark()
    for i in range(2):  # warm: the small working set is already in the baseline
        assert srv.post(f"warm {i}", **SEQ)[0] == 200
    reply = srv.inj.arm("1*cmdbuf_oom(deferred)@wired=active+1MiB,path=sequential")
    limit = reply["sizes"]["0"]["wired"]
    for i in range(3):
        assert srv.post(f"small {i}", rid=f"small-{i}", **SEQ)[0] == 200
    assert not _by_event(srv.inj, since, "fired")
    big = " ".join(f"w{i}" for i in range(3000))  # a long prompt grows the KV cache
    srv.post(big, rid="big", max_tokens=4, **SEQ)
    fired = srv.inj.wait_for("fired", since=since)
    mem, crossing = fired["memory"], fired["crossing"]
    assert crossing["limit"] == "wired" and crossing["limit_bytes"] == limit
    assert crossing["value"] == mem["active"] + mem["cache"] + crossing["requested"]
    assert crossing["value"] > limit == fired["wired_limit"]
    assert fired["request_ids"] == ["big"]
    limits = [e for e in _by_event(srv.inj, since, "limits") if "wired" in e]
    assert limits and limits[-1]["wired"]["value"] == limit


def test_hang_blocks_until_disarm(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("1*hang@site=decode,path=batched")
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=srv.post(rid="hang-1", timeout=30)))
    t.start()
    srv.inj.wait_for("fired", since=since)
    t.join(2.0)
    assert t.is_alive(), "the request finished while the evaluation should hang"
    assert srv.inj.status()["hanging"] == 1
    srv.inj.disarm()
    t.join(20.0)
    assert not t.is_alive()
    assert result["r"][0] == 200


def test_chain_fires_on_third_hit(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("2*off->1*runtime_error->off@site=decode,path=sequential")
    srv.post(rid="chain", max_tokens=16, **SEQ)
    fired = srv.inj.wait_for("fired", since=since)
    assert fired["kind"] == "runtime_error"
    summary = srv.inj.disarm()["points"][0]
    assert summary["hits"] == 3 and summary["fired"] == 1


def test_request_filter_fires_only_for_tagged_request(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("1*runtime_error@request=target,path=sequential")
    assert srv.post(rid="bystander", **SEQ)[0] == 200
    assert not _by_event(srv.inj, since, "fired")
    srv.post(rid="target", **SEQ)
    assert srv.inj.wait_for("fired", since=since)["request_ids"] == ["target"]


def test_strict_arm_over_socket_and_locally(srv: Live) -> None:
    with pytest.raises(InjectorError, match="did you mean 'cmdbuf_oom'"):
        srv.inj._call({"op": "arm", "spec": "1*cmdbuf_om(abort)"})
    with pytest.raises(FaultSpecError, match="did you mean 'cmdbuf_oom'"):
        srv.inj.arm("1*cmdbuf_om(abort)")
    assert srv.inj.status()["spec"] is None


def test_not_fired_is_reported(srv: Live) -> None:
    srv.inj.arm("1*cmdbuf_oom@request=never-sent")
    assert srv.post(rid="other")[0] == 200
    reply = srv.inj.disarm()
    assert reply["fired"] == 0 and reply["points"][0]["fired"] == 0


def test_request_events_carry_cache_and_memory(srv: Live) -> None:
    since = srv.mark()
    assert srv.post("remember this prompt", rid="ev-1")[0] == 200
    end = srv.inj.wait_for("request_end", lambda e: e["request_id"] == "ev-1", since=since)
    start = srv.inj.wait_for("request_start", lambda e: e["request_id"] == "ev-1", since=since)
    assert end["cache"]["sequences"] >= 1 and end["cache"]["bytes"] > 0
    assert start["memory"]["active"] > 0
    snap = srv.inj.snapshot()
    assert snap["cache"]["sequences"] >= 1 and snap["memory"]["active"] > 0


# ---------------------------------------------------------------------- bootstrap


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_bootstrap_chains_and_is_inert_when_unconfigured(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    marker = tmp_path / "marker"
    (other / "sitecustomize.py").write_text(
        f"open({str(marker)!r}, 'w').write('chained')\n", encoding="utf-8"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("METALOOM_")}
    base["PYTHONPATH"] = str(other)
    env = {**base, **bootstrap_env(tmp_path / "run", base_env=base)}
    for key in ("METALOOM_EVENTS", "METALOOM_CONTROL"):
        env.pop(key)
    code = "import sys; print('mlx' in sys.modules, 'pytest_metaloom' in sys.modules)"
    out = _run_python(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    assert marker.read_text() == "chained"
    assert not (tmp_path / "run" / "events.jsonl").exists()


def test_bootstrap_installs_when_configured_and_rejects_bad_env(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("METALOOM_")}
    env = {**base, **bootstrap_env(tmp_path / "run", base_env=base)}
    env.pop("METALOOM_CONTROL")
    code = (
        "import sys\n"
        "from pytest_metaloom.inject import runtime\n"
        "before = (runtime.RUNTIME is not None, 'mlx.core' in sys.modules)\n"
        "import mlx_lm.server\n"
        "import mlx.core as mx\n"
        "print(*before, runtime.RUNTIME is not None, mx.eval.__module__)\n"
    )
    out = _run_python(code, env)
    assert out.returncode == 0, out.stderr
    # inert in any process (a wrapper, a supervisor) until mlx_lm.server is imported
    assert out.stdout.split() == [
        "False",
        "False",
        "True",
        "pytest_metaloom.inject.runtime.patches",
    ]
    events = Injector(tmp_path / "none.sock", env["METALOOM_EVENTS"]).events()
    started = [e for e in events if e["event"] == "started"]
    assert started and started[0]["semantics_default"] == "deferred"
    bad = {**env, "METALOOM_FAULTS": "cmdbuf_om"}
    out = _run_python("pass", bad)
    assert out.returncode == 2 and "did you mean 'cmdbuf_oom'" in out.stderr


def test_live_limits_are_applied_for_real(srv: Live) -> None:
    since = srv.mark()
    reply = srv.inj.set_limits(wired="active+1MiB", memory="1GiB")
    base = srv.inj.snapshot()["baselines"]["active"]
    assert reply["memory"] == {
        "value": 2**30,
        "previous": reply["memory"]["previous"],
        "accepted": True,
    }
    assert reply["wired"]["accepted"] is True
    assert base <= reply["wired"]["value"] <= base + 2**21
    assert srv.inj.wait_for("limits", since=since)["source"] == "control"
    with pytest.raises(InjectorError, match="unknown size unit"):
        srv.inj.set_limits(wired="3XB")


def test_event_reader_tolerates_partial_line_and_times_out_clearly(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('{"event": "started", "t": 1, "pid": 1}\n{"event": "fir', encoding="utf-8")
    inj = Injector(tmp_path / "absent.sock", log)
    assert [e["event"] for e in inj.events()] == ["started"]
    with pytest.raises(TimeoutError, match="no 'fired' event within 0.2s") as info:
        inj.wait_for("fired", timeout=0.2)
    assert '"started"' in str(info.value)
    assert inj.ping(timeout=0.5) is False
    with pytest.raises(InjectorError, match="cannot reach the injector"):
        inj.status(timeout=0.5)


def test_bootstrap_env_paths_and_early_validation(tmp_path: Path) -> None:
    env = bootstrap_env(tmp_path / "r", faults="1*cmdbuf_oom", base_env={"PYTHONPATH": "/x"})
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts[0].endswith("pytest_metaloom/inject/bootstrap") and parts[-1] == "/x"
    assert Path(parts[1], "pytest_metaloom", "__init__.py").is_file()
    assert env["METALOOM_FAULTS"] == "1*cmdbuf_oom"
    in_run_dir = str(tmp_path / "r" / "metaloom.sock")
    if len(os.fsencode(in_run_dir)) <= 100:  # fits in sockaddr_un: the socket stays in the run dir
        assert env["METALOOM_CONTROL"] == in_run_dir
    else:  # a long TMPDIR (CI's private one): the process's short socket dir
        assert len(env["METALOOM_CONTROL"]) <= 100
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    long_env = bootstrap_env(deep, base_env={})
    short = Path(long_env["METALOOM_CONTROL"])
    assert len(os.fsencode(str(short))) <= 100
    assert short.parent.parent == Path("/tmp") and short.parent.name.startswith("mlm-")
    # one short dir per process, one socket name per run dir: building env creates no dir
    # per call (that is what left hundreds of /tmp/mlm-* behind)
    other = bootstrap_env(tmp_path / ("f" * 60) / ("g" * 60), base_env={})
    assert Path(other["METALOOM_CONTROL"]).parent == short.parent
    assert other["METALOOM_CONTROL"] != str(short)
    assert bootstrap_env(deep, base_env={})["METALOOM_CONTROL"] == str(short)
    assert long_env["METALOOM_EVENTS"] == str(deep / "events.jsonl")
    with pytest.raises(FaultSpecError, match="did you mean 'cmdbuf_oom'"):
        bootstrap_env(tmp_path / "r", faults="cmdbuf_om")
    with pytest.raises(FaultSpecError, match="wired=SIZE or memory=SIZE"):
        bootstrap_env(tmp_path / "r", limits="wird=1GiB")


# ---------------------------------------------------------------------- counter filters


def _hits(srv: Live, spec: str, **post: Any) -> dict[str, Any]:
    """Arm ``spec``, send one sequential request, return the point's disarm summary."""
    srv.inj.arm(spec)
    srv.post(**{"max_tokens": 12, **post, **SEQ})
    return srv.inj.disarm()["points"][0]


def test_after_evals_and_nth_eval_count_only_matching_evaluations(srv: Live) -> None:
    # 'off' never fires, so the same request runs to its end and every hit is counted
    base = "off@site=decode,path=sequential"
    every = _hits(srv, base, content="count me")["hits"]
    assert every >= 6, f"too few decode evaluations ({every}) to test the counters"
    assert _hits(srv, base + ",after_evals=4", content="count me")["hits"] == every - 4
    assert _hits(srv, base + ",nth_eval=3", content="count me")["hits"] == 1
    assert _hits(srv, base + f",nth_eval={every + 50}", content="count me")["hits"] == 0


def test_nth_eval_fires_on_that_evaluation_only(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("1*runtime_error@site=decode,path=sequential,nth_eval=3")
    srv.post(rid="nth-eval", max_tokens=12, **SEQ)
    fired = srv.inj.wait_for("fired", since=since)
    summary = srv.inj.disarm()["points"][0]
    assert fired["request_ids"] == ["nth-eval"]
    assert summary["hits"] == 1 and summary["fired"] == 1  # evaluations 1 and 2 were no hits


def test_nth_request_counts_requests_since_arming(srv: Live) -> None:
    srv.post(rid="before-arming", **SEQ)  # requests before arming do not count
    since = srv.mark()
    srv.inj.arm("1*runtime_error@nth_request=2,path=sequential")
    assert srv.post(rid="nth-1", **SEQ)[0] == 200
    assert not _by_event(srv.inj, since, "fired")
    srv.post(rid="nth-2", **SEQ)
    assert srv.inj.wait_for("fired", since=since)["request_ids"] == ["nth-2"]
    assert srv.post(rid="nth-3", **SEQ)[0] == 200  # the count was used up


def test_after_requests_fires_from_the_next_request_on(srv: Live) -> None:
    since = srv.mark()
    srv.inj.arm("2*runtime_error@after_requests=2,path=sequential")
    assert [srv.post(rid=f"ar-{i}", **SEQ)[0] for i in (1, 2)] == [200, 200]
    assert not _by_event(srv.inj, since, "fired")
    for rid in ("ar-3", "ar-4"):
        status, body = srv.post(rid=rid, **SEQ)
        assert status is None or b"choices" not in body  # dropped: no complete answer
    fired = _by_event(srv.inj, since, "fired")
    assert [f["request_ids"] for f in fired] == [["ar-3"], ["ar-4"]]


def test_after_tokens_waits_for_generated_tokens(srv: Live) -> None:
    tokens_at_arming = srv.inj.status()["tokens"]
    since = srv.mark()
    srv.inj.arm("1*runtime_error@after_tokens=5,site=decode,path=sequential")
    assert srv.post(rid="few", max_tokens=3, **SEQ)[0] == 200  # at most 3 tokens: no hit
    assert not _by_event(srv.inj, since, "fired")
    srv.post(rid="many", max_tokens=32, **SEQ)
    fired = srv.inj.wait_for("fired", since=since)
    assert fired["request_ids"] == ["many"]
    assert fired["tokens"] - tokens_at_arming > 5


def _first_loss(seed: int, percent: float) -> int:
    """Which hit a 'P%off->1*kind' chain fires on: the first draw that 'off' loses."""
    import random

    rng = random.Random(seed)
    hit = 1
    while rng.random() * 100 < percent:
        hit += 1
    return hit


def test_percent_with_seed_is_reproducible_in_the_live_server(srv: Live) -> None:
    # seeds whose firing hit is early enough for one request, and differs between them
    seeds: dict[int, int] = {}
    for seed in range(1, 500):
        hit = _first_loss(seed, 60)
        if 2 <= hit <= 6 and hit not in seeds.values():
            seeds[seed] = hit
        if len(seeds) == 2:
            break
    observed: dict[int, list[int]] = {}
    for seed, expected in seeds.items():
        for attempt in range(2):
            since = srv.mark()
            srv.inj.arm(f"60%off->1*runtime_error@site=decode,path=sequential,seed={seed}")
            srv.post(rid=f"pct-{seed}-{attempt}", max_tokens=24, **SEQ)
            srv.inj.wait_for("fired", since=since)
            summary = srv.inj.disarm()["points"][0]
            assert summary["fired"] == 1
            observed.setdefault(seed, []).append(summary["hits"])
        assert observed[seed] == [expected, expected], (seed, observed)
    assert len({hits[0] for hits in observed.values()}) == 2  # the seed decides


# ---------------------------------------------------------------------- start-up limits, stream


def test_metaloom_limits_are_applied_at_start_up(model_dir: Path, tmp_path: Path) -> None:
    env = bootstrap_env(tmp_path, limits="wired=active+64MiB,memory=2GiB")
    inj = Injector.from_env(env)
    server = ServerProcess(model=model_dir, env=env, log_dir=tmp_path, name="limits")
    try:
        server.start()  # the warm-up completion is the first request: limits apply there
        event = inj.wait_for("limits", timeout=10)
        start = inj.wait_for("request_start", timeout=10)
        snap = inj.snapshot()
    finally:
        server.stop()
    assert event["source"] == "env"
    assert event["memory"] == {
        "value": 2 * 2**30,
        "previous": event["memory"]["previous"],
        "accepted": True,
    }
    active = start["memory"]["active"] + start["memory"]["cache"]
    assert event["wired"]["accepted"] and event["wired"]["value"] >= 64 * 2**20
    assert event["wired"]["value"] <= active + 64 * 2**20 + 2**20
    assert snap["memory_limit"] == 2 * 2**30 and snap["wired_limit"] == event["wired"]["value"]
    assert not [e for e in inj.events() if e["event"] in ("armed", "fired")]


def test_stream_fault_after_tokens_ends_without_done_on_stock(srv: Live) -> None:
    from pytest_metaloom.judge import workload

    since = srv.mark()
    srv.inj.arm("1*resource_limit@site=decode,path=sequential,after_tokens=2,request=strm")
    obs = workload.chat(
        srv.srv.url,
        workload.single_turn("stream to me"),
        request_id="strm",
        stream=True,
        max_tokens=16,
        seed=1,
        deadline=30,
    )
    fired = srv.inj.wait_for("fired", since=since)
    assert fired["request_ids"] == ["strm"] and fired["site"] == "decode"
    assert obs.status == 200 and obs.token_events >= 2  # tokens reached the client first
    assert not obs.done and obs.error_event is None  # then the stream just stopped
    assert not obs.timed_out
    assert srv.health() == 200  # the sequential path survives


# Evaluation counts that put the n-th matching evaluation on each kind of call in turn
# (generate_step: async_eval of the next token, y.item() of this one, the server's
# logprobs[token].item()), and memory-caused points over the same counts. Their limit is
# absolute and tiny, so every evaluation is over it: one relative to the usage when armed
# can stay uncrossed when the request evicts prompt-cache entries.
WAIT_SWEEP = [f"site=decode,path=sequential,after_evals={k}" for k in range(6)] + [
    f"memory=1KiB,path=sequential,after_evals={k}" for k in range(2, 6)
]


def test_allocator_faults_never_fire_where_mlx_lm_only_waits(srv: Live) -> None:
    """An allocator fault whose count or memory crossing comes due at ``y.item()`` or
    ``mx.eval(y)`` (which only wait on work committed by ``mx.async_eval``) is held
    there and fires at the next evaluation that allocates."""
    if VERSION not in WAIT_ONLY_LINES:
        pytest.skip(f"no wait-only lines named for mlx-lm {VERSION}")
    waits = WAIT_ONLY_LINES[VERSION]
    seen = []
    for i, filters in enumerate(WAIT_SWEEP):
        since = srv.mark()
        srv.inj.arm(f"1*resource_limit@{filters}")
        srv.post(f"wait sweep {i}", rid=f"wait-{i}", **SEQ)
        fired = srv.inj.wait_for("fired", since=since)
        srv.inj.disarm()
        assert fired["timing"] == "instead" and fired["request_ids"] == [f"wait-{i}"]
        seen.append((filters, fired["where"], fired.get("held")))
        assert srv.health() == 200  # the sequential path drops the request, not the thread
    assert [s for s in seen if s[1].split()[0] in waits] == []
    assert sum(h for _, _, h in seen) > 0, f"no point came due at a wait: {seen}"
