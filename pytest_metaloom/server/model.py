"""Offline tiny llama model for driving a real ``mlx_lm.server`` with no model hub.

The harness needs a model that loads through mlx-lm's own loading code, serves chat requests with
tools, and is small enough to start in a second on a shared CPU. Everything here is generated
locally and deterministically from a :class:`ModelSpec`, so a test run is reproducible and the
result can be cached by the spec's hash.

mlx is imported lazily inside the functions that need it: the pytest plugin imports this module
at collection time and must stay light.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pytest_metaloom import units

#: Bump when the files written by :func:`build_tiny_model` change, so old caches are not reused.
FORMAT_VERSION = 1

#: The file whose presence marks a finished build; written last inside the temporary directory.
MARKER_FILE = "metaloom-model.json"

#: The config dtypes a tiny model may use, and their widths (from ``units.py``).
DTYPE_BYTES: dict[str, int] = {name: units.DTYPE_BYTES[name] for name in units.FLOAT_DTYPES}

# Special tokens. The tool-call pair matches mlx-lm's ``json_tools`` parser, so the server
# reports ``has_tool_calling`` and accepts ``tools`` in chat requests.
BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
SPECIAL_TOKENS = (BOS, EOS, PAD, END_OF_TURN, *ROLE_TOKENS, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

MIN_VOCAB = 300
MAX_VOCAB = 8192

# The training text for the tokenizer: written for this project, plain and varied enough that
# the common English fragments and the JSON punctuation of tool calls get their own merges.
_CORPUS = (
    "The harbour was quiet before dawn, and the fishing boats rocked against the pier.",
    "A kettle whistled in the kitchen while somebody searched the drawer for matches.",
    "Please check the weather for tomorrow; we plan to walk along the river to the old mill.",
    "The server answered every request until the memory ran out, then it stopped talking.",
    "Seven green bottles stood on the shelf next to a jar of buttons and a broken clock.",
    "She wrote the numbers down: 3, 14, 159, 2653 and 58979, then added them twice.",
    "Is the library open on Sunday afternoons, or only in the morning after nine?",
    "Turn left at the bakery, cross the bridge, and the station is on your right.",
    "The recipe asks for flour, butter, sugar, two eggs and a pinch of salt.",
    "Our test starts a process, sends a question, waits for an answer and checks the status.",
    "When the cache grows too large the operator lowers the limit and restarts the service.",
    "Mountains covered in snow reflected the light of a pale and distant winter sun.",
    '{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}',
    '{"name": "lookup", "arguments": {"query": "opening hours", "limit": 5}}',
    '{"temperature": 21, "condition": "sunny", "humidity": 0.4, "wind": "light"}',
    "system: You are a careful assistant. user: What time is it? assistant: It is noon.",
    "Tool results arrive as plain text; the assistant reads them and replies to the user.",
    "Birds gathered on the wire, counted themselves, and flew south without a word.",
    "A good test fails for one clear reason and says what to change to make it pass.",
    "Rain fell on the tin roof all night, steady and patient, like a slow drum.",
)

# A chat template in Jinja (rendered by transformers). It renders system, user, assistant
# (with OpenAI-shaped ``tool_calls`` whose arguments are a mapping or a JSON string) and tool
# messages, lists the ``tools`` when given, and ends with an open assistant turn on request.
# ``tool_call.name`` and ``<tool_call>`` both appear so mlx-lm can infer the json_tools parser.
CHAT_TEMPLATE = (
    "{% macro text(content) %}"
    "{% if content is none %}"
    "{% elif content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% if tools %}"
    "<|system|>You may call these tools. Reply with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call> to call one.'
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "<|end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "<|system|>{{ text(message.content) }}<|end|>\n"
    "{% elif message.role == 'user' %}"
    "<|user|>{{ text(message.content) }}<|end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|assistant|>{{ text(message.content) }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set tool_call = call.function if call.function is defined else call %}"
    '<tool_call>{"name": {{ tool_call.name | tojson }}, "arguments": '
    "{% if tool_call.arguments is string %}{{ tool_call.arguments }}"
    "{% else %}{{ (tool_call.arguments or {}) | tojson }}{% endif %}"
    "}</tool_call>"
    "{% endfor %}"
    "<|end|>\n"
    "{% elif message.role == 'tool' %}"
    "<|tool|>{% if message.name is defined and message.name %}{{ message.name }}: {% endif %}"
    "{{ text(message.content) }}<|end|>\n"
    "{% else %}"
    "{{ raise_exception('unsupported chat role: ' ~ message.role) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelError(ValueError):
    """A model directory or spec that the harness cannot use; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """The parameters of a tiny llama model; equal specs build byte-identical directories."""

    layers: int = 2
    hidden_size: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    dtype: str = "float16"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "layers",
            "hidden_size",
            "heads",
            "kv_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelError(f"ModelSpec.{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ModelError(
                f"ModelSpec.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}"
            )
        if self.hidden_size % self.heads:
            raise ModelError(
                f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}; "
                "pick sizes where hidden_size % heads == 0"
            )
        if self.heads % self.kv_heads:
            raise ModelError(
                f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}; "
                "grouped-query attention needs heads % kv_heads == 0"
            )
        if (self.hidden_size // self.heads) % 2:
            raise ModelError(
                f"head_dim {self.hidden_size // self.heads} is odd; RoPE needs an even head_dim"
            )
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise ModelError(
                f"vocab_size {self.vocab_size} is out of range; use {MIN_VOCAB}..{MAX_VOCAB} "
                "(256 byte tokens and the special tokens need room)"
            )
        if self.max_position_embeddings < 16:
            raise ModelError("max_position_embeddings must be at least 16")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ModelError(f"ModelSpec.seed must be a non-negative integer, got {self.seed!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    def key(self) -> str:
        """Hash of every field plus the format version: the cache directory's name."""
        payload = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def config(self) -> dict[str, Any]:
        """The ``config.json`` mlx-lm's llama model reads."""
        bos_id, eos_id, end_id = 0, 1, 3  # positions in SPECIAL_TOKENS, fixed by the trainer
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_traditional": False,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "torch_dtype": self.dtype,
            "bos_token_id": bos_id,
            "eos_token_id": [eos_id, end_id],
            "metaloom": {"format": FORMAT_VERSION, "spec": asdict(self)},
        }


# --------------------------------------------------------------------------- sizes


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal checkpoints nest the language model's fields under ``text_config``."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
        return config["text_config"]
    return config


def _config_dtype(config: Mapping[str, Any]) -> str:
    """The activation dtype; checkpoints without one are assumed float16 (mlx-lm's usual)."""
    cfg = _text_config(config)
    dtype = (
        cfg.get("torch_dtype")
        or cfg.get("dtype")
        or config.get("torch_dtype")
        or config.get("dtype")
        or "float16"
    )
    if dtype not in DTYPE_BYTES:
        raise ModelError(
            f"config dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}; "
            "set torch_dtype in config.json"
        )
    return dtype


def kv_bytes_per_token_from_config(
    config: Mapping[str, Any],
    kv_bits: int | None = None,
    kv_group_size: int = units.DEFAULT_KV_GROUP_SIZE,
) -> int:
    """KV-cache bytes one token adds, as mlx-lm's caches store it (the formula: ``units.py``)."""
    cfg = _text_config(config)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
    except KeyError as exc:
        raise ModelError(
            f"config has no {exc.args[0]!r}; kv bytes need num_hidden_layers, "
            "num_attention_heads and hidden_size (a llama-style config.json)"
        ) from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    try:
        return units.kv_bytes_per_token(
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype_bytes=DTYPE_BYTES[_config_dtype(config)],
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def kv_bytes_per_token(spec_or_config: ModelSpec | Mapping[str, Any] | str | os.PathLike) -> int:
    """KV bytes per token for a spec, a config dict or a model directory."""
    if isinstance(spec_or_config, ModelSpec):
        return kv_bytes_per_token_from_config(spec_or_config.config())
    if isinstance(spec_or_config, Mapping):
        return kv_bytes_per_token_from_config(spec_or_config)
    return kv_bytes_per_token_from_config(read_config(spec_or_config))


def _safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def weights_bytes(model_dir: str | os.PathLike) -> int:
    """Sum of tensor bytes in the directory's safetensors files, read from their headers only."""
    total = 0
    for path in _safetensors_files(validate_model_dir(model_dir)):
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelError(
                    f"{path} is not a safetensors file (too short); rebuild or re-download it"
                )
            (header_len,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(fh.read(header_len))
            except ValueError as exc:
                raise ModelError(f"{path} has a corrupt safetensors header: {exc}") from None
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                total += end - start
    return total


# --------------------------------------------------------------------------- validation


def validate_model_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a usable model directory, or raise :class:`ModelError` saying why."""
    model_dir = Path(path).expanduser()
    if not model_dir.exists():
        raise ModelError(
            f"model path {model_dir} does not exist; pass a directory with config.json, "
            "or omit --metaloom-model to use the built-in tiny model"
        )
    if not model_dir.is_dir():
        raise ModelError(
            f"model path {model_dir} is a file, not a directory; pass the directory that holds "
            "config.json and the *.safetensors weights"
        )
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"model directory {model_dir} has no config.json; pass an MLX/Hugging Face model "
            "directory, or omit --metaloom-model to use the built-in tiny model"
        )
    if not _safetensors_files(model_dir):
        raise ModelError(
            f"model directory {model_dir} has no *.safetensors weights; convert the model with "
            "`mlx_lm.convert` or omit --metaloom-model to use the built-in tiny model"
        )
    return model_dir


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a validated model directory."""
    path = validate_model_dir(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); fix or regenerate it") from None


def describe_model(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The sizes a report header shows: shape, dtype, weight bytes and KV bytes per token."""
    model_dir = validate_model_dir(model_dir)
    config = read_config(model_dir)
    cfg = _text_config(config)
    heads = int(cfg["num_attention_heads"])
    return {
        "path": str(model_dir),
        "model_type": config.get("model_type"),
        "layers": int(cfg["num_hidden_layers"]),
        "hidden_size": int(cfg["hidden_size"]),
        "heads": heads,
        "kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        "vocab_size": cfg.get("vocab_size"),
        "dtype": _config_dtype(config),
        "weights_bytes": weights_bytes(model_dir),
        "kv_bytes_per_token": kv_bytes_per_token_from_config(config),
    }


# --------------------------------------------------------------------------- building


def _corpus(vocab_size: int) -> list[str]:
    """Training lines: the built-in text plus filler words from a fixed RNG.

    The filler guarantees there are always enough pair merges to reach ``vocab_size``; its RNG
    is fixed (not the spec's seed) so the tokenizer depends only on the vocabulary size.
    """
    import random

    rng = random.Random(20240607)
    letters = "etaoinshrdlucmfwypvbgk"
    filler = []
    for _ in range(max(0, vocab_size - 200)):
        length = rng.randint(3, 9)
        filler.append("".join(rng.choice(letters) for _ in range(length)))
    lines = list(_CORPUS)
    lines.extend(" ".join(filler[i : i + 12]) for i in range(0, len(filler), 12))
    return lines


def _write_tokenizer(out: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer and write the files AutoTokenizer loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(vocab_size), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise ModelError(
            f"tokenizer training reached {actual} tokens, not {vocab_size}; "
            "pick a smaller vocab_size"
        )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise ModelError(f"special token {token} did not get id {expected_id}")
    tokenizer.save(str(out / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
        "tool_parser_type": "json_tools",
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": tokenizer_config["additional_special_tokens"],
        },
    )
    return actual


def _write_weights(out: Path, spec: ModelSpec, config: dict[str, Any]) -> None:
    """Random llama weights from the seed, scaled small so logits stay finite in float16."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    shapes = sorted((name, tuple(p.shape)) for name, p in tree_flatten(model.parameters()))
    rng = np.random.default_rng(spec.seed)
    dtype = getattr(mx, spec.dtype)
    weights = {}
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            values = np.ones(shape, dtype=np.float32)
        else:
            # 0.02 like common llama inits; the output projections are scaled down by depth so
            # the residual stream does not grow with the layer count.
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= (2 * spec.layers) ** 0.5
            values = rng.normal(0.0, std, size=shape).astype(np.float32)
        weights[name] = mx.array(values).astype(dtype)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def default_cache_dir() -> Path:
    """``$METALOOM_CACHE_DIR`` if set, else ``~/.cache/pytest-metaloom/models``."""
    env = os.environ.get("METALOOM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pytest-metaloom" / "models"


def model_dir_for(spec: ModelSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`build_tiny_model` puts (or finds) the model for ``spec``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"tiny-llama-{spec.key()}"


def _write_model(out: Path, spec: ModelSpec) -> None:
    config = spec.config()
    _write_tokenizer(out, spec.vocab_size)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    _write_weights(out, spec, config)
    _write_json(out / MARKER_FILE, {"format": FORMAT_VERSION, "key": spec.key(), **asdict(spec)})


def build_tiny_model(
    spec: ModelSpec | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Build the model for ``spec`` once and return its directory.

    The files are written into a temporary sibling directory and renamed into place, so a reader
    never sees a half-written model. When two processes (xdist workers) race, the first rename
    wins and the loser discards its copy: both get the same, complete directory.
    """
    spec = spec if spec is not None else ModelSpec()
    final = model_dir_for(spec, cache_dir)
    if (final / MARKER_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A directory without the marker cannot come from this code (the rename is atomic);
        # refuse to guess rather than delete something a user put there.
        raise ModelError(
            f"{final} exists but is not a finished metaloom model (no {MARKER_FILE}); "
            "delete it and run again"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _write_model(tmp, spec)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER_FILE).is_file():
                raise
            # Another process finished first; its copy is byte-identical to ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ModelSpec()
    parser = argparse.ArgumentParser(
        prog="python -m pytest_metaloom.server.model",
        description="Build (or find in the cache) the offline tiny llama model and describe it.",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="cache directory (default: $METALOOM_CACHE_DIR)"
    )
    for field in fields(ModelSpec):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "dtype":
            parser.add_argument(flag, choices=sorted(DTYPE_BYTES), default=defaults.dtype)
        else:
            parser.add_argument(flag, type=int, default=getattr(defaults, field.name))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        spec = ModelSpec(**{f.name: getattr(args, f.name) for f in fields(ModelSpec)})
        path = build_tiny_model(spec, args.out)
        info = describe_model(path)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(path)
        for key, value in info.items():
            if key != "path":
                print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
