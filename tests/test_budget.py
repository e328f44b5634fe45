"""The wired-memory budget: formula, safetensors headers, the seed report, sysctl, live KV."""

from __future__ import annotations

import gc
import importlib.util
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_metaloom.tools.budget import (
    GB,
    GIB,
    KV_STEP,
    MIB,
    BudgetError,
    BudgetInputs,
    Ceiling,
    active_kv_bytes,
    compute_budget,
    default_wired_ceiling,
    format_report,
    inputs_from_model_dir,
    kv_bytes_per_token,
    parse_size,
    read_safetensors_header,
    resolve_ceiling,
    weights_info,
)

LLAMA_8B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "torch_dtype": "bfloat16",
}
# The seed report: 48 GB Mac, ~16 GB model, 15.55 GB prompt cache (its log line), long
# multi-turn context. 96 KiB/token is a 48-layer, 4-KV-head, head_dim 128 bf16 model.
SEED_KV = 2 * 48 * 4 * 128 * 2


def seed_inputs(**overrides: object) -> BudgetInputs:
    values: dict[str, object] = dict(
        weights_bytes=16 * GB,
        kv_bytes_per_token=SEED_KV,
        ceiling=resolve_ceiling(ram_bytes=48 * GIB, platform="linux"),
        prompt_cache_bytes=parse_size("15.55GB"),
        context=80_000,
    )
    values.update(overrides)
    return BudgetInputs(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GB", 24 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000), ("4096", 4096)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_unknown_units() -> None:
    with pytest.raises(BudgetError, match="24GB or 512MiB"):
        parse_size("3 parsecs")


def test_kv_formula_on_config() -> None:
    assert kv_bytes_per_token(LLAMA_8B) == 2 * 32 * 8 * 128 * 2  # 128 KiB/token
    with_head_dim = dict(LLAMA_8B, head_dim=64, torch_dtype="float32")
    assert kv_bytes_per_token(with_head_dim) == 2 * 32 * 8 * 64 * 4
    quantized = kv_bytes_per_token(LLAMA_8B, kv_bits=4)
    assert quantized == pytest.approx(2 * 32 * 8 * 128 * (0.5 + 2 * 2 / 64))
    nested = {"model_type": "vlm", "text_config": LLAMA_8B}
    assert kv_bytes_per_token(nested) == kv_bytes_per_token(LLAMA_8B)
    no_dtype = {k: v for k, v in LLAMA_8B.items() if k != "torch_dtype"}
    assert kv_bytes_per_token(no_dtype, dtype="float32") == 2 * 32 * 8 * 128 * 4


def test_kv_formula_errors_name_the_fix() -> None:
    with pytest.raises(BudgetError, match="--kv-bytes-per-token"):
        kv_bytes_per_token({"hidden_size": 10})
    with pytest.raises(BudgetError, match="--kv-bits"):
        kv_bytes_per_token(LLAMA_8B, kv_bits=7)


def test_kv_formula_agrees_with_model_module() -> None:
    if importlib.util.find_spec("pytest_metaloom.server.model") is None:
        pytest.skip("pytest_metaloom.server.model not written yet")
    from pytest_metaloom.server.model import kv_bytes_per_token_from_config

    for config in (LLAMA_8B, dict(LLAMA_8B, torch_dtype="float16", head_dim=256)):
        assert kv_bytes_per_token(config) == kv_bytes_per_token_from_config(config)


def test_safetensors_headers_are_summed(tmp_path: Path) -> None:
    import mlx.core as mx

    tensors = {
        "a": mx.zeros((64, 32), dtype=mx.float16),
        "b": mx.zeros((10,), dtype=mx.float32),
        "q": mx.zeros((128, 16), dtype=mx.uint32),
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    mx.save_safetensors(str(tmp_path / "model-2.safetensors"), {"c": mx.ones((7,), mx.bfloat16)})
    header = read_safetensors_header(tmp_path / "model.safetensors")
    assert set(header) - {"__metadata__"} == {"a", "b", "q"}
    info = weights_info(tmp_path)
    assert info.total_bytes == 64 * 32 * 2 + 10 * 4 + 128 * 16 * 4 + 7 * 2
    assert info.files == 2 and info.float_dtype == "float16"


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(BudgetError, match="re-download"):
        weights_info(tmp_path)
    with pytest.raises(BudgetError, match="no \\*.safetensors"):
        weights_info(tmp_path / "missing")


def test_seed_report_crosses_only_with_active_kv() -> None:
    report = compute_budget(seed_inputs())
    ceiling = report.ceiling_bytes
    assert ceiling == 36 * GIB  # the "~36 GB" default of a 48 GB machine
    assert report.weights_bytes + report.prompt_cache_bytes < ceiling  # cache alone is fine
    assert not report.fits and report.headroom_bytes < 0
    # the crossing context is consistent with the table: below it fits, above it does not
    at = report.crossing_context
    assert 60_000 < at < 80_000
    assert compute_budget(seed_inputs(context=at - 512)).fits
    assert not compute_budget(seed_inputs(context=at + 512)).fits
    assert report.crossing_turn == at // 2000 + 1
    text = format_report(report)
    assert "CROSSES THE CEILING" in text and "iogpu.wired_limit_mb=" in text


def test_seed_configured_budget_cannot_fit_at_all() -> None:
    report = compute_budget(seed_inputs(prompt_cache_bytes=24 * GB))
    assert report.crossing_context == 0
    assert any("before any request" in note for note in report.notes)


def test_suggested_settings_fit() -> None:
    report = compute_budget(seed_inputs())
    assert report.suggested_prompt_cache_bytes is not None
    assert report.suggested_wired_limit_mb is not None
    smaller_cache = compute_budget(
        seed_inputs(prompt_cache_bytes=report.suggested_prompt_cache_bytes)
    )
    assert smaller_cache.fits
    raised = compute_budget(
        seed_inputs(
            ceiling=Ceiling(report.suggested_wired_limit_mb * MIB, "test", 48 * GIB),
        )
    )
    assert raised.fits
    assert report.suggested_wired_limit_mb * MIB <= 48 * GIB - 8 * GIB


def test_prompt_cache_estimate_is_labelled() -> None:
    report = compute_budget(seed_inputs(prompt_cache_bytes=None, context=4096))
    assert report.prompt_cache_estimated
    assert report.prompt_cache_bytes == 10 * 4096 * SEED_KV
    assert "estimate" in report.prompt_cache_basis


def test_default_ceiling_rule() -> None:
    assert default_wired_ceiling(24 * GIB) == 16 * GIB
    assert default_wired_ceiling(48 * GIB) == 36 * GIB
    assert default_wired_ceiling(128 * GIB) == 96 * GIB


def _stand_in_sysctl(directory: Path, wired_mb: str, memsize: str, fail: bool = False) -> None:
    """A stand-in for macOS's sysctl (not present on Linux), put first on PATH."""
    script = directory / "sysctl"
    body = (
        "echo 'sysctl: unknown oid' >&2; exit 1"
        if fail
        else (
            'case "$2" in\n'
            f"  iogpu.wired_limit_mb) echo {wired_mb} ;;\n"
            f"  hw.memsize) echo {memsize} ;;\n"
            "  *) exit 1 ;;\n"
            "esac"
        )
    )
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(
    ("wired_mb", "expected", "source"),
    [("0", 36 * GIB, "macOS default"), ("40960", 40 * GIB, "sysctl iogpu.wired_limit_mb")],
)
def test_macos_ceiling_through_stand_in_sysctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wired_mb: str, expected: int, source: str
) -> None:
    _stand_in_sysctl(tmp_path, wired_mb, str(48 * GIB))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    ceiling = resolve_ceiling(platform="darwin")
    assert ceiling.bytes == expected
    assert ceiling.source.startswith(source)
    assert ceiling.ram_bytes == 48 * GIB


def test_failing_sysctl_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_sysctl(tmp_path, "", "", fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BudgetError, match="--wired-limit-mb"):
        resolve_ceiling(platform="darwin")


def test_linux_without_a_ceiling_is_an_error() -> None:
    with pytest.raises(BudgetError, match="pass --wired-limit-mb"):
        resolve_ceiling(platform="linux")
    assert resolve_ceiling(1024, platform="linux").bytes == GIB


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("pytest_metaloom.server.model") is None:
        pytest.skip("pytest_metaloom.server.model (tiny model builder) not written yet")
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    spec = ModelSpec(layers=4, hidden_size=256, heads=8, kv_heads=4, intermediate_size=256)
    return build_tiny_model(spec, cache_dir=tmp_path_factory.mktemp("models"))


def test_model_dir_inputs(tiny_model_dir: Path) -> None:
    inputs = inputs_from_model_dir(tiny_model_dir, ceiling=Ceiling(GIB, "test"))
    on_disk = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert 0.95 * on_disk < inputs.weights_bytes <= on_disk
    assert inputs.kv_bytes_per_token == 2 * 4 * 4 * 32 * 2


def test_predicted_kv_growth_matches_mlx(tiny_model_dir: Path) -> None:
    """Multi-turn KV growth measured with MLX's allocator counter vs the budget's prediction.

    In-process (mlx_lm.load + make_prompt_cache + forward passes), so the formula is checked
    without a server; :func:`test_live_server_kv_growth_matches_budget` checks it in one.
    """
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(tiny_model_dir))
    predicted_per_token = inputs_from_model_dir(
        tiny_model_dir, ceiling=Ceiling(GIB, "test")
    ).kv_bytes_per_token
    cache = make_prompt_cache(model)
    gc.collect()
    base = mx.get_active_memory()
    tokens_per_turn, context = 512, 0
    for turn in range(4):
        prompt = mx.array([[(7 * turn + i) % 500 + 1 for i in range(tokens_per_turn)]])
        logits = model(prompt, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        del logits
        gc.collect()
        context += tokens_per_turn
        measured = mx.get_active_memory() - base
        predicted = active_kv_bytes(predicted_per_token, context, 1)
        assert measured == pytest.approx(predicted, rel=0.10), f"turn {turn + 1}"
        assert sum(c.nbytes for c in cache) == pytest.approx(predicted, rel=0.10)


# --- the same prediction against a live mlx_lm.server ------------------------------------------

# More layers and KV heads than the default tiny model, float32: 2 KiB of KV per token, so a
# turn's growth (hundreds of KB) dwarfs any allocator noise, while a turn still takes about a
# second on a shared CPU.
LIVE_SPEC = dict(
    layers=4,
    hidden_size=64,
    heads=4,
    kv_heads=4,
    intermediate_size=128,
    dtype="float32",
    max_position_embeddings=16384,
)
LIVE_TURNS = 7
LIVE_DOCUMENT_WORDS = 130  # about 730 prompt tokens per turn with the tiny tokenizer
LIVE_MAX_TOKENS = 8
MIN_SPAN_TOKENS = 10 * KV_STEP  # see the step-allocation note below


@dataclass
class ToolLoop:
    """What a live tool loop left behind: the budget's inputs, usages and in-server events."""

    kv: float
    weights_bytes: int
    context: list[int]  # tokens the conversation holds after each turn: prompt + reply
    after: list[dict]  # the prompt cache and memory after each turn (the next request_start)
    starts: list[dict]  # every request_start event, warm-up first
    ids: list[str]


def run_tool_loop(run_dir: Path, server_args: list[str], turns: int) -> ToolLoop:
    """Start a real server, drive a ``turns``-turn tool loop through it, stop it, return facts.

    The server runs the injector's event log, whose ``request_start`` events carry the prompt
    cache (``sequences``, ``bytes``) and MLX's ``active`` counter read inside the server. The
    requests carry a ``seed`` so they take the sequential path, which keeps one KV cache per
    request and stores it in the prompt cache once, at the end.
    """
    if importlib.util.find_spec("pytest_metaloom.server.live") is None:
        pytest.skip("pytest_metaloom.server.live not written yet")
    from pytest_metaloom.judge import workload
    from pytest_metaloom.server.live import LiveServer
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    model_dir = build_tiny_model(ModelSpec(**LIVE_SPEC))  # type: ignore[arg-type]
    budget = inputs_from_model_dir(model_dir, ceiling=Ceiling(GIB, "test"))
    usages: list[dict] = []
    ids: list[str] = []
    with LiveServer(
        run_dir=run_dir, model=model_dir, server_args=server_args, name="budget-live"
    ) as server:
        messages = workload.tool_loop_start()
        # one turn more than asked: its request_start is the after-state of the last turn
        for turn in range(1, turns + 2):
            messages = workload.tool_loop_turn(messages, turn, document_words=LIVE_DOCUMENT_WORDS)
            rid = workload.new_request_id(f"turn{turn}")
            obs = workload.chat(
                server.url,
                messages,
                request_id=rid,
                max_tokens=LIVE_MAX_TOKENS,
                seed=1,
                deadline=60.0,
            )
            assert obs.ok, f"turn {turn}: {obs.summary()}\n{server.log_tail()}"
            assert obs.usage is not None, f"turn {turn} reported no usage"
            usages.append(obs.usage)
            ids.append(rid)
        # The handler thread logs request_end after it sent the answer: wait for it (bounded).
        for rid in ids:
            server.injector.wait_for(
                "request_end", lambda e, rid=rid: e.get("request_id") == rid, timeout=10.0
            )
        events = server.events()

    starts = [e for e in events if e["event"] == "request_start"]
    # The server stores a turn's cache after queueing the end of its answer, so request_end
    # (written by the handler thread once the answer is sent) can read the cache before that
    # store. The next request's request_start is emitted by the generation thread strictly
    # after the store: it is the turn's after-state.
    next_start = {e["request_id"]: e for e in starts}
    after = [next_start[following] for following in ids[1:]]
    ids, usages = ids[:turns], usages[:turns]
    return ToolLoop(
        kv=budget.kv_bytes_per_token,
        weights_bytes=budget.weights_bytes,
        context=[u["prompt_tokens"] + u["completion_tokens"] for u in usages],
        after=after,
        starts=starts,
        ids=ids,
    )


# Step allocation: KVCache grows its buffers 256 tokens at a time (and, when it grows after a
# trim, first cuts the buffer back to the tokens it holds), so after any turn a sequence's buffer
# has between 0 and 256 tokens of unused room. The growth between two turns can therefore differ
# from kv x tokens-added by up to one step's worth in either direction (the first turn shows
# it: its ~790 tokens sit in a 1025-token buffer). Per turn that is the bound we assert; over a
# span of N >= 2560 tokens it is at most 256/N <= 10%, so the mean growth per turn over the
# span is what the budget's per-token figure must predict within 10%.


@pytest.mark.timeout(240)
def test_live_server_kv_growth_matches_budget(tmp_path: Path) -> None:
    """A real server in a tool loop: prompt-cache bytes and active memory grow as budgeted.

    ``--prompt-cache-size 1`` makes the prompt cache hold just this conversation, so its growth
    per turn is the KV of the tokens the turn added (the default keeps every turn: see
    :func:`test_live_default_prompt_cache_keeps_every_turn`).
    """
    loop = run_tool_loop(tmp_path / "server", ["--prompt-cache-size", "1"], LIVE_TURNS)
    kv = loop.kv
    assert kv == 2 * 4 * 4 * 16 * 4
    # Weights: before the first request (the warm-up) MLX holds only the model.
    assert loop.starts[0]["memory"]["active"] == pytest.approx(loop.weights_bytes, rel=0.10)
    assert all(e["cache"]["sequences"] == 1 for e in loop.after), [e["cache"] for e in loop.after]

    context = loop.context
    cache_bytes = [e["cache"]["bytes"] for e in loop.after]
    active = [e["memory"]["active"] for e in loop.after]
    slack = (KV_STEP + 1) * kv
    for k in range(1, LIVE_TURNS):
        added = context[k] - context[k - 1]
        for name, series in (("prompt cache bytes", cache_bytes), ("memory.active", active)):
            growth = series[k] - series[k - 1]
            assert abs(growth - kv * added) <= slack, (
                f"turn {k + 1}: {name} grew {growth} B for {added} tokens, "
                f"budget predicts {kv * added:.0f} B (+/- one {KV_STEP}-token step)"
            )
    span_tokens = context[-1] - context[0]
    assert span_tokens >= MIN_SPAN_TOKENS, (
        f"only {span_tokens} tokens between first and last turn: raise LIVE_DOCUMENT_WORDS "
        "or LIVE_TURNS so the 256-token step stays under 10%"
    )
    turns = LIVE_TURNS - 1
    predicted_per_turn = kv * span_tokens / turns
    for name, series in (("prompt cache bytes", cache_bytes), ("memory.active", active)):
        per_turn = (series[-1] - series[0]) / turns
        assert per_turn == pytest.approx(predicted_per_turn, rel=0.10), name
    # Nothing but the prompt cache grows: the rest of active memory stays put across turns.
    rest = [a - c for a, c in zip(active, cache_bytes, strict=True)]
    assert max(rest) - min(rest) <= slack, rest


@pytest.mark.timeout(240)
def test_live_default_prompt_cache_keeps_every_turn(tmp_path: Path) -> None:
    """With the default ``--prompt-cache-size`` (10) each turn stays as a whole sequence.

    The model's reply diverges from the tool-call message the client sends next, so a turn's
    cached sequence is never a prefix of the next one and is not dropped: one conversation fills
    the cache with copies of itself, each as long as the context was. That is how a tool loop
    reaches "10 sequences" and why the budget's estimate without ``--prompt-cache-bytes`` is
    sequences x context x KV bytes/token.
    """
    turns = 4
    loop = run_tool_loop(tmp_path / "server", [], turns)
    kv = loop.kv
    # Before turn 1 the cache holds the warm-up request's sequence, which stays too.
    (warmup,) = [e["cache"] for e in loop.starts if e["request_id"] == loop.ids[0]]
    assert warmup["sequences"] == 1
    sequences = [e["cache"]["sequences"] for e in loop.after]
    assert sequences == [warmup["sequences"] + k for k in range(1, turns + 1)]
    cache_bytes = [warmup["bytes"]] + [e["cache"]["bytes"] for e in loop.after]
    for k in range(turns):
        growth = cache_bytes[k + 1] - cache_bytes[k]
        whole = kv * loop.context[k]
        # -1 token: the reply's last token is returned but never run through the model.
        assert -kv <= growth - whole <= KV_STEP * kv, (
            f"turn {k + 1}: the cache grew {growth} B; a whole {loop.context[k]}-token "
            f"sequence is {whole:.0f} B (+ less than one {KV_STEP}-token step)"
        )
    total_tokens = sum(loop.context)
    held = cache_bytes[-1] - cache_bytes[0]
    assert held == pytest.approx(kv * total_tokens, rel=0.10)
