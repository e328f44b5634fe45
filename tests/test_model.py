"""Tests for the offline tiny model: real builds, real mlx-lm loading, a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pytest_metaloom.server import model as model_module
from pytest_metaloom.server.model import (
    MARKER_FILE,
    ModelError,
    ModelSpec,
    build_tiny_model,
    describe_model,
    kv_bytes_per_token,
    kv_bytes_per_token_from_config,
    validate_model_dir,
    weights_bytes,
)
from pytest_metaloom.server.process import DEFAULT_READY_TIMEOUT

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def tool_loop_messages(arguments: object) -> list[dict]:
    """A multi-turn tool loop: system, user, assistant tool call, tool result, user."""
    return [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "What is the weather in Lisbon?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"},
        {"role": "user", "content": "Thanks! And tomorrow?"},
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(ModelSpec(), tmp_path_factory.mktemp("models"))


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_metaloom.server.model", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- building and cache


def test_build_writes_a_complete_llama_directory(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert MARKER_FILE in names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2
    assert config["num_key_value_heads"] == 2
    assert config["vocab_size"] == 512
    assert config["tie_word_embeddings"] is True
    # No leftover temporary build directories next to the model.
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_same_spec_is_byte_identical_across_processes(model_dir: Path, tmp_path: Path) -> None:
    # The second build runs in a fresh interpreter, so per-process hash seeds cannot hide.
    result = run_cli("--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    other = Path(info["path"])
    assert other.parent == tmp_path and other.name == model_dir.name
    assert read_tree(other) == read_tree(model_dir)
    assert info["kv_bytes_per_token"] == kv_bytes_per_token(ModelSpec())


def test_different_seed_changes_the_weights_not_the_tokenizer(
    model_dir: Path, tmp_path: Path
) -> None:
    other = build_tiny_model(ModelSpec(seed=1), tmp_path)
    assert other.name != model_dir.name
    assert (other / "model.safetensors").read_bytes() != (
        model_dir / "model.safetensors"
    ).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_second_call_reuses_the_cached_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_tiny_model(ModelSpec(layers=1), tmp_path)
    weights = first / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (first / MARKER_FILE).stat().st_mtime_ns)

    def rebuilt(*args: object) -> None:
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(model_module, "_write_model", rebuilt)
    second = build_tiny_model(ModelSpec(layers=1), tmp_path)
    assert second == first
    assert (weights.stat().st_mtime_ns, (first / MARKER_FILE).stat().st_mtime_ns) == before


def test_cache_dir_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALOOM_CACHE_DIR", str(tmp_path / "env-cache"))
    path = build_tiny_model(ModelSpec(layers=1))
    assert path.parent == tmp_path / "env-cache"


def test_concurrent_builds_of_one_spec_agree(tmp_path: Path) -> None:
    # Two real processes race to build the same spec into one cache directory.
    cmd = [sys.executable, "-m", "pytest_metaloom.server.model", "--out", str(tmp_path), "--json"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out)["path"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert outputs[0] == outputs[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(outputs[0]).name]
    assert (Path(outputs[0]) / MARKER_FILE).is_file()


# --------------------------------------------------------------------------- mlx-lm compatibility


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_mlx_lm_loads_and_generates(model_dir: Path, tmp_path: Path, dtype: str) -> None:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    path = model_dir if dtype == "float16" else build_tiny_model(ModelSpec(dtype=dtype), tmp_path)
    model, tokenizer = load(str(path))
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)

    prompt = tokenizer.encode("The weather in Lisbon is")
    logits = model(mx.array(prompt)[None])
    assert bool(mx.all(mx.isfinite(logits)).item()), "random init overflowed"

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=8))
    assert len(responses) >= 1
    assert responses[-1].generation_tokens >= 1


def test_chat_template_renders_a_tool_loop(model_dir: Path) -> None:
    from mlx_lm import load

    _, tokenizer = load(str(model_dir))
    assert tokenizer.has_tool_calling, "mlx-lm would reject tools for this tokenizer"
    assert tokenizer.tool_call_start == "<tool_call>"

    for arguments in ({"city": "Lisbon"}, '{"city": "Lisbon"}'):
        text = tokenizer.apply_chat_template(
            tool_loop_messages(arguments), tools=TOOLS, add_generation_prompt=True, tokenize=False
        )
        assert "You answer weather questions." in text
        assert (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Lisbon"}}</tool_call>'
            in text
        )
        assert "21 C and sunny" in text
        assert '"description": "Current weather for a city"' in text  # the tools listing
        assert text.startswith("<|bos|>")
        assert text.endswith("<|assistant|>")

    closed = tokenizer.apply_chat_template(
        tool_loop_messages({"city": "Lisbon"}), add_generation_prompt=False, tokenize=False
    )
    assert not closed.endswith("<|assistant|>")
    with pytest.raises(Exception, match="unsupported chat role: robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


# --------------------------------------------------------------------------- sizes


def test_kv_bytes_per_token_matches_a_real_prompt_cache(model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(model_dir))
    cache = make_prompt_cache(model)
    step = cache[0].step
    tokens = mx.arange(2 * step) % 500

    mx.eval(model(tokens[None, :step], cache=cache))
    first = sum(c.nbytes for c in cache)
    mx.eval(model(tokens[None, step:], cache=cache))
    second = sum(c.nbytes for c in cache)

    measured = (second - first) / step
    assert measured == kv_bytes_per_token(model_dir) == 256  # 2 * 2 layers * 2 heads * 16 * 2 B


def test_quantized_kv_bytes_match_a_real_quantized_cache(tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import QuantizedKVCache

    spec = ModelSpec(layers=1, hidden_size=128, heads=2, kv_heads=1, intermediate_size=128)
    path = build_tiny_model(spec, tmp_path)
    model, _ = load(str(path))
    cache = [QuantizedKVCache(group_size=64, bits=4) for _ in model.layers]
    step = cache[0].step
    tokens = mx.arange(2 * step) % 500

    mx.eval(model(tokens[None, :step], cache=cache))
    first = sum(c.nbytes for c in cache)
    mx.eval(model(tokens[None, step:], cache=cache))
    measured = (sum(c.nbytes for c in cache) - first) / step

    config = json.loads((path / "config.json").read_text())
    assert measured == kv_bytes_per_token_from_config(config, kv_bits=4)
    assert measured < kv_bytes_per_token_from_config(config)


def test_kv_bytes_formula_reads_foreign_configs() -> None:
    # Shapes of a typical 8B llama checkpoint: 32 layers, 8 kv heads of 128, bfloat16.
    config = {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "torch_dtype": "bfloat16",
    }
    assert kv_bytes_per_token_from_config(config) == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token_from_config({"text_config": config}) == 131072
    with pytest.raises(ModelError, match="num_hidden_layers"):
        kv_bytes_per_token_from_config({"hidden_size": 64})
    with pytest.raises(ModelError, match="kv_bits 7"):
        kv_bytes_per_token_from_config(config, kv_bits=7)


def test_describe_model_and_weights_bytes(model_dir: Path) -> None:
    import mlx.core as mx

    arrays = mx.load(str(model_dir / "model.safetensors"))
    assert weights_bytes(model_dir) == sum(a.nbytes for a in arrays.values())
    info = describe_model(model_dir)
    assert info == {
        "path": str(model_dir),
        "model_type": "llama",
        "layers": 2,
        "hidden_size": 64,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "dtype": "float16",
        "weights_bytes": weights_bytes(model_dir),
        "kv_bytes_per_token": 256,
    }


# --------------------------------------------------------------------------- validation


def test_validation_names_the_cause_and_the_fix(tmp_path: Path, model_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=r"model path .*nope does not exist; pass a directory"):
        validate_model_dir(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        validate_model_dir(empty)

    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"has no \*\.safetensors weights"):
        validate_model_dir(empty)

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ModelError, match="is a file, not a directory"):
        validate_model_dir(a_file)

    assert validate_model_dir(str(model_dir)) == model_dir


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"hidden_size": 62}, "not divisible by heads"),
        ({"hidden_size": 60}, "head_dim 15 is odd"),
        ({"kv_heads": 3}, "not a multiple of kv_heads"),
        ({"vocab_size": 100}, "vocab_size 100 is out of range"),
        ({"layers": 0}, "layers must be a positive integer"),
    ],
)
def test_bad_spec_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ModelSpec(**kwargs)


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli("--out", str(tmp_path), "--kv-heads", "3")
    assert result.returncode == 2
    assert "error: heads 4 is not a multiple of kv_heads 3" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate the server's whole session, escalating to SIGKILL; bounded."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def test_real_server_serves_a_tool_loop(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir)]
            + ["--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        # the harness's own ready bound (a bound on the wait, not a claim about speed)
        deadline = time.monotonic() + DEFAULT_READY_TIMEOUT
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (
                f"server not ready in {DEFAULT_READY_TIMEOUT:.0f} s:\n{log_path.read_text()}"
            )
            time.sleep(0.2)

        response = requests.post(
            f"{base}/v1/chat/completions",
            json={
                "messages": tool_loop_messages('{"city": "Lisbon"}'),
                "tools": TOOLS,
                "max_tokens": 8,
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["prompt_tokens"] > 50
        assert body["usage"]["completion_tokens"] >= 1
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert "does not support tool calling" not in log_path.read_text()
    finally:
        stop_group(proc)
    assert proc.returncode is not None


def test_import_stays_light() -> None:
    # The plugin imports this module at collection time; mlx and tokenizers must stay lazy.
    code = (
        "import sys, pytest_metaloom.server.model\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('mlx', 'mlx_lm', 'tokenizers', 'transformers', 'numpy')]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"


def test_spec_from_text_presets_pairs_and_errors():
    from pytest_metaloom.server.model import ModelError, ModelSpec, spec_from_text

    assert spec_from_text("tiny") == ModelSpec()
    large = spec_from_text("large")
    assert (large.layers, large.hidden_size, large.max_position_embeddings) == (8, 1024, 1 << 20)
    assert spec_from_text("large,layers=4").layers == 4
    assert spec_from_text("max_position_embeddings=1<<16,dtype=bfloat16") == ModelSpec(
        max_position_embeddings=1 << 16, dtype="bfloat16"
    )
    with pytest.raises(ModelError, match="neither a preset"):
        spec_from_text("huge")
    with pytest.raises(ModelError, match="key 'depth' is unknown"):
        spec_from_text("depth=3")
    with pytest.raises(ModelError, match="layers='x' is not an integer"):
        spec_from_text("layers=x")
