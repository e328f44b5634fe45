"""Wired-memory budget: will model + prompt cache + active KV fit under the GPU's wired ceiling?

The field crash this project answers (seed report) was not the prompt cache overflowing its own
budget: it was the *sum* of weights, prompt cache and a long multi-turn request's KV crossing
macOS's ``iogpu.wired_limit_mb`` ceiling. This module does that sum from the model's files
(safetensors headers and ``config.json``, no tensors loaded) or from numbers given directly, and
says at which context length, and after how many turns, a multi-turn workload crosses.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_metaloom import units
from pytest_metaloom.units import DTYPE_BYTES, GB, GIB, MIB, format_bytes  # noqa: F401 - re-exported

KV_STEP = 256
"""mlx-lm's ``KVCache`` grows its buffers in steps of this many tokens."""
DEFAULT_PROMPT_CACHE_SIZE = 10
"""mlx_lm.server's default ``--prompt-cache-size``."""
DEFAULT_CONTEXT = 32768
DEFAULT_TOKENS_PER_TURN = 2000
DEFAULT_KV_GROUP_SIZE = units.DEFAULT_KV_GROUP_SIZE
SAFETY_FRACTION = 0.05
"""Suggestions leave this share of the ceiling free for activations and fragmentation."""
OS_RESERVE_BYTES = 8 * GIB
"""A raised wired limit should still leave the OS at least this much RAM."""
SYSCTL_TIMEOUT = 5.0

_FLOAT_SAFETENSORS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class BudgetError(ValueError):
    """Bad input or an unknowable ceiling; the message names the cause and the fix."""


def parse_size(text: str | int) -> int:
    """``24GB`` -> 24e9, ``512MiB`` -> 512 * 2**20, ``1.5G`` -> 1.5e9; plain numbers are bytes.

    The one size grammar (``units.py``); decimal units match mlx_lm.server's own
    ``--prompt-cache-bytes`` parsing.
    """
    try:
        return units.parse_size(text)
    except units.SizeError as exc:
        raise BudgetError(
            f"cannot read size {text!r}: {exc.problem}; e.g. 24GB or 512MiB"
        ) from None


# --- model files -----------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8-byte little-endian length, then JSON."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise BudgetError(f"{path} is too short to be a safetensors file: re-download it")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100 * MIB):
            raise BudgetError(f"{path} has an impossible header length {length}: re-download it")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise BudgetError(
                f"{path} has a corrupt safetensors header ({exc}): re-download it"
            ) from None
    if not isinstance(header, dict):
        raise BudgetError(f"{path} header is not a JSON object: re-download it")
    return header


@dataclass(frozen=True)
class WeightsInfo:
    """Tensor bytes in a model directory and the float dtype holding most of them."""

    total_bytes: int
    files: int
    float_dtype: str | None


def weights_info(model_dir: str | Path) -> WeightsInfo:
    """Sum tensor sizes over all ``*.safetensors`` files, reading headers only."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BudgetError(
            f"no *.safetensors files in {model_dir}: pass an MLX model directory, "
            "or give --weights-bytes and --kv-bytes-per-token instead"
        )
    total = 0
    by_dtype: dict[str, int] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            try:
                start, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise BudgetError(
                    f"{path}: tensor {name!r} has no data_offsets: re-download it"
                ) from None
            total += end - start
            dtype = info.get("dtype", "")
            if dtype in _FLOAT_SAFETENSORS:
                by_dtype[dtype] = by_dtype.get(dtype, 0) + end - start
    float_dtype = _FLOAT_SAFETENSORS[max(by_dtype, key=by_dtype.__getitem__)] if by_dtype else None
    return WeightsInfo(total, len(files), float_dtype)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BudgetError(
            f"{path} not found: pass a model directory that has a config.json"
        ) from None
    except ValueError as exc:
        raise BudgetError(f"{path} is not valid JSON ({exc}): fix or re-download it") from None


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(nested, Mapping):
        return nested
    return config


def config_dtype(config: Mapping[str, Any], fallback: str | None = None) -> str:
    """Activation (and so KV) dtype: ``torch_dtype``/``dtype`` in config, else the weights'."""
    cfg = _text_config(config)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or fallback
    if dtype is None:
        raise BudgetError(
            "config.json names no torch_dtype/dtype and the weights hold no float tensors: "
            "pass --kv-bytes-per-token"
        )
    if dtype not in DTYPE_BYTES:
        raise BudgetError(
            f"unknown dtype {dtype!r} in config.json: expected float16, bfloat16 or float32"
        )
    return str(dtype)


def kv_bytes_per_token(
    config: Mapping[str, Any],
    *,
    dtype: str | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
) -> int:
    """Bytes of K and V one token adds across all layers (the formula: ``units.py``)."""
    cfg = _text_config(config)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except KeyError as exc:
        raise BudgetError(
            f"config.json has no {exc.args[0]!r}: pass --kv-bytes-per-token for this model"
        ) from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if "hidden_size" not in cfg:
            raise BudgetError(
                "config.json has neither head_dim nor hidden_size: pass --kv-bytes-per-token"
            )
        head_dim = int(cfg["hidden_size"]) // heads
    try:
        return units.kv_bytes_per_token(
            layers=layers,
            kv_heads=kv_heads,
            head_dim=int(head_dim),
            dtype_bytes=DTYPE_BYTES[config_dtype(config, dtype)],
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
    except ValueError as exc:
        raise BudgetError(f"--kv-bits {kv_bits} / --kv-group-size {kv_group_size}: {exc}") from None


# --- the wired ceiling -----------------------------------------------------------------------


def run_sysctl(name: str) -> str:
    """``sysctl -n NAME`` with the ``sysctl`` found on PATH (tests put a stand-in there)."""
    exe = shutil.which("sysctl")
    if exe is None:
        raise BudgetError(f"no sysctl on PATH to read {name}: pass --wired-limit-mb")
    try:
        done = subprocess.run(
            [exe, "-n", name], capture_output=True, text=True, timeout=SYSCTL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise BudgetError(
            f"sysctl -n {name} did not answer in {SYSCTL_TIMEOUT:.0f}s: pass --wired-limit-mb"
        ) from None
    if done.returncode != 0:
        raise BudgetError(
            f"sysctl -n {name} failed ({done.stderr.strip() or done.returncode}): "
            "pass --wired-limit-mb"
        )
    return done.stdout.strip()


def default_wired_ceiling(ram_bytes: int) -> int:
    """Approximation of macOS's default wired ceiling (``iogpu.wired_limit_mb=0``).

    About 2/3 of RAM on machines up to 36 GiB, 3/4 above. Apple does not document the rule;
    this matches what MLX reports as ``max_recommended_working_set_size`` closely enough to
    budget with, not to the byte.
    """
    return ram_bytes * 2 // 3 if ram_bytes <= 36 * GIB else ram_bytes * 3 // 4


@dataclass(frozen=True)
class Ceiling:
    bytes: int
    source: str
    ram_bytes: int | None = None


def resolve_ceiling(
    wired_limit_mb: int | None = None,
    *,
    ram_bytes: int | None = None,
    platform: str = sys.platform,
    sysctl: Callable[[str], str] = run_sysctl,
) -> Ceiling:
    """The wired ceiling: the flag, else sysctl on macOS, else the default for ``ram_bytes``."""
    if wired_limit_mb is not None:
        if wired_limit_mb <= 0:
            raise BudgetError("--wired-limit-mb must be positive (0 means 'OS default': use --ram)")
        return Ceiling(wired_limit_mb * MIB, "--wired-limit-mb", ram_bytes)
    if platform == "darwin":
        raw = sysctl("iogpu.wired_limit_mb")
        try:
            limit_mb = int(raw)
        except ValueError:
            raise BudgetError(
                f"sysctl iogpu.wired_limit_mb printed {raw!r}: pass --wired-limit-mb"
            ) from None
        if ram_bytes is None:
            try:
                ram_bytes = int(sysctl("hw.memsize"))
            except ValueError:
                raise BudgetError(
                    "sysctl hw.memsize is not a number: pass --wired-limit-mb"
                ) from None
        if limit_mb > 0:
            return Ceiling(limit_mb * MIB, "sysctl iogpu.wired_limit_mb", ram_bytes)
        return Ceiling(
            default_wired_ceiling(ram_bytes),
            "macOS default (iogpu.wired_limit_mb=0), approximated from hw.memsize",
            ram_bytes,
        )
    if ram_bytes is not None:
        return Ceiling(
            default_wired_ceiling(ram_bytes), "macOS default approximated from --ram", ram_bytes
        )
    raise BudgetError(
        f"cannot read the wired ceiling on {platform} (no iogpu sysctl): "
        "pass --wired-limit-mb N (or --ram SIZE for the macOS default of that machine)"
    )


# --- the budget ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetInputs:
    """Everything the sum needs; sizes in bytes."""

    weights_bytes: int
    kv_bytes_per_token: float
    ceiling: Ceiling
    prompt_cache_bytes: int | None = None
    prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE
    context: int = DEFAULT_CONTEXT
    concurrent: int = 1
    tokens_per_turn: int = DEFAULT_TOKENS_PER_TURN
    overhead_bytes: int = 0
    model: str | None = None
    weights_basis: str = "--weights-bytes"

    def __post_init__(self) -> None:
        for name in ("prompt_cache_size", "context", "concurrent", "tokens_per_turn"):
            value = getattr(self, name)
            if value < (0 if name == "prompt_cache_size" else 1):
                flag = "--" + name.replace("_", "-")
                raise BudgetError(f"{flag} must be a positive number, got {value}")
        if self.kv_bytes_per_token <= 0:
            raise BudgetError("--kv-bytes-per-token must be positive")
        if self.weights_bytes < 0 or (self.prompt_cache_bytes or 0) < 0:
            raise BudgetError("sizes must not be negative")


@dataclass(frozen=True)
class BudgetReport:
    """The breakdown, the verdict and settings that would fit."""

    model: str | None
    weights_bytes: int
    weights_basis: str
    prompt_cache_bytes: int
    prompt_cache_estimated: bool
    prompt_cache_basis: str
    active_kv_bytes: int
    context: int
    concurrent: int
    kv_bytes_per_token: float
    overhead_bytes: int
    total_bytes: int
    ceiling_bytes: int
    ceiling_source: str
    ram_bytes: int | None
    headroom_bytes: int
    fits: bool
    crossing_context: int
    crossing_turn: int
    tokens_per_turn: int
    suggested_prompt_cache_bytes: int | None
    suggested_wired_limit_mb: int | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def active_kv_bytes(kv_per_token: float, context: int, concurrent: int) -> int:
    """KV of ``concurrent`` live sequences; buffers grow in ``KV_STEP``-token steps."""
    steps = math.ceil(context / KV_STEP) * KV_STEP
    return int(kv_per_token * steps * concurrent)


def compute_budget(inputs: BudgetInputs) -> BudgetReport:
    """Sum the wired demand, compare with the ceiling, find the crossing, suggest settings."""
    kv = inputs.kv_bytes_per_token
    if inputs.prompt_cache_bytes is not None:
        cache = inputs.prompt_cache_bytes
        estimated = False
        basis = "--prompt-cache-bytes"
    else:
        cache = int(inputs.prompt_cache_size * inputs.context * kv)
        estimated = True
        basis = (
            f"estimate: {inputs.prompt_cache_size} sequences x {inputs.context} tokens x "
            f"{kv:,.0f} B/token (no --prompt-cache-bytes given)"
        )
    active = active_kv_bytes(kv, inputs.context, inputs.concurrent)
    fixed = inputs.weights_bytes + cache + inputs.overhead_bytes
    total = fixed + active
    ceiling = inputs.ceiling.bytes
    headroom = ceiling - total

    room_for_kv = ceiling - fixed
    per_step = kv * inputs.concurrent
    crossing = max(0, int(room_for_kv // per_step)) if room_for_kv > 0 else 0
    turn = crossing // inputs.tokens_per_turn + 1

    margin = int(ceiling * SAFETY_FRACTION)
    fit_cache = ceiling - margin - inputs.weights_bytes - inputs.overhead_bytes - active
    suggested_cache = fit_cache if fit_cache > 0 else None
    need = total + margin
    suggested_mb = math.ceil(need / MIB / 1024) * 1024
    notes: list[str] = []
    if inputs.ceiling.ram_bytes is not None and suggested_mb * MIB > (
        inputs.ceiling.ram_bytes - OS_RESERVE_BYTES
    ):
        notes.append(
            f"iogpu.wired_limit_mb={suggested_mb} would leave the OS less than "
            f"{OS_RESERVE_BYTES // GIB} GiB of {format_bytes(inputs.ceiling.ram_bytes)} RAM: "
            "shrink the prompt cache or the context instead"
        )
        suggested_limit: int | None = None
    else:
        suggested_limit = suggested_mb
    if suggested_cache is None:
        notes.append(
            "no --prompt-cache-bytes fits: weights plus the active KV at this context alone "
            "reach the ceiling; lower --context/--concurrent or use --kv-bits"
        )
    if fixed >= ceiling:
        notes.append(
            "weights + prompt cache already reach the ceiling before any request's KV: "
            "every long request can crash the server"
        )
    if estimated:
        notes.append("the prompt cache size is an estimate; pass --prompt-cache-bytes to pin it")
    return BudgetReport(
        model=inputs.model,
        weights_bytes=inputs.weights_bytes,
        weights_basis=inputs.weights_basis,
        prompt_cache_bytes=cache,
        prompt_cache_estimated=estimated,
        prompt_cache_basis=basis,
        active_kv_bytes=active,
        context=inputs.context,
        concurrent=inputs.concurrent,
        kv_bytes_per_token=kv,
        overhead_bytes=inputs.overhead_bytes,
        total_bytes=total,
        ceiling_bytes=ceiling,
        ceiling_source=inputs.ceiling.source,
        ram_bytes=inputs.ceiling.ram_bytes,
        headroom_bytes=headroom,
        fits=headroom > 0,
        crossing_context=crossing,
        crossing_turn=turn,
        tokens_per_turn=inputs.tokens_per_turn,
        suggested_prompt_cache_bytes=suggested_cache,
        suggested_wired_limit_mb=suggested_limit,
        notes=notes,
    )


def format_report(report: BudgetReport) -> str:
    """The human table printed by ``metaloom budget``."""
    rows = [
        ("weights", report.weights_bytes, report.weights_basis),
        (
            "prompt cache" + (" (est.)" if report.prompt_cache_estimated else ""),
            report.prompt_cache_bytes,
            report.prompt_cache_basis,
        ),
        (
            "active KV",
            report.active_kv_bytes,
            f"{report.concurrent} x {report.context} tokens x {report.kv_bytes_per_token:,.0f} "
            "B/token",
        ),
    ]
    if report.overhead_bytes:
        rows.append(("overhead", report.overhead_bytes, "--overhead"))
    lines = [f"wired-memory budget{' for ' + report.model if report.model else ''}", ""]
    for name, size, why in rows:
        lines.append(f"  {name:<20} {format_bytes(size):>10}   {why}")
    lines.append(f"  {'total':<20} {format_bytes(report.total_bytes):>10}")
    lines.append(
        f"  {'wired ceiling':<20} {format_bytes(report.ceiling_bytes):>10}   "
        f"{report.ceiling_source}"
    )
    verdict = "fits" if report.fits else "CROSSES THE CEILING"
    lines.append(f"  {'headroom':<20} {format_bytes(report.headroom_bytes):>10}   {verdict}")
    lines.append("")
    lines.append(
        f"A multi-turn conversation crosses the ceiling at {report.crossing_context:,} tokens of "
        f"context per sequence: turn {report.crossing_turn} at {report.tokens_per_turn:,} "
        "tokens per turn."
    )
    lines.append("Settings that would fit this workload:")
    if report.suggested_prompt_cache_bytes is not None:
        lines.append(
            f"  mlx_lm.server --prompt-cache-bytes {report.suggested_prompt_cache_bytes}"
            f"   ({format_bytes(report.suggested_prompt_cache_bytes)})"
        )
    if report.suggested_wired_limit_mb is not None:
        lines.append(
            f"  sudo sysctl iogpu.wired_limit_mb={report.suggested_wired_limit_mb}"
            "   (leave the OS several GB; resets on reboot)"
        )
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def inputs_from_model_dir(
    model_dir: str | Path,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    **kwargs: Any,
) -> BudgetInputs:
    """Build inputs from a model directory's safetensors headers and config.json."""
    path = Path(model_dir)
    if not path.is_dir():
        raise BudgetError(f"model directory {path} does not exist: pass an MLX model directory")
    weights = weights_info(path)
    kv = kv_bytes_per_token(
        read_config(path), dtype=weights.float_dtype, kv_bits=kv_bits, kv_group_size=kv_group_size
    )
    basis = f"safetensors headers ({weights.files} file{'s' if weights.files != 1 else ''})"
    return BudgetInputs(
        weights_bytes=weights.total_bytes,
        kv_bytes_per_token=kv,
        model=str(path),
        weights_basis=basis,
        **kwargs,
    )
