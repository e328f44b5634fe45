"""One home for the facts several modules share: sizes, limits, dtype widths, the KV formula.

Fault specs, ``METALOOM_LIMITS``, the real-Metal plan, ``metaloom budget`` and the tiny
model all read sizes and compute KV bytes; each used to carry its own copy, and the copies
disagreed (``"1.5G"`` was a size to the budget and an error to a fault spec). This module
imports nothing but the standard library: it also runs inside the server under test.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40

SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "k": KB,
    "kb": KB,
    "m": MB,
    "mb": MB,
    "g": GB,
    "gb": GB,
    "t": TB,
    "tb": TB,
    "kib": KIB,
    "mib": MIB,
    "gib": GIB,
    "tib": TIB,
}
"""Decimal units (``K``/``KB``...) as mlx_lm.server's ``--prompt-cache-bytes`` reads them;
binary units spelled ``KiB``... Case does not matter; a bare number is bytes."""
UNIT_NAMES = ("B", "K", "KB", "M", "MB", "G", "GB", "T", "TB", "KiB", "MiB", "GiB", "TiB")

SIZE_BASES = ("active", "allocated", "peak", "limit")
"""Names a size expression may start from, resolved inside the server (MLX's counters):
``active`` is active + cache memory, ``allocated`` the live arrays alone
(``mx.get_active_memory()``), ``peak`` the allocator's high-water mark, ``limit`` the
recommended working set (else RAM)."""

LIMIT_KEYS = ("wired", "memory")
"""The two MLX limits a limits text sets: ``wired=SIZE,memory=SIZE``."""

DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
}
"""Bytes per value of the float dtypes a checkpoint (config name or safetensors tag) uses."""
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
"""The dtype names a ``config.json`` (``torch_dtype``) uses."""

KV_BITS = (2, 3, 4, 5, 6, 8)
"""The KV-cache quantization widths MLX supports."""
DEFAULT_KV_GROUP_SIZE = 64
"""mlx_lm.server's default ``--kv-group-size``."""

_NUM = r"\d+(?:\.\d+)?"
_SIZE_NUM = re.compile(rf"^\s*({_NUM})\s*([A-Za-z]*)\s*$")
_SIZE_MUL = re.compile(rf"^\s*({_NUM})\s*\*\s*([A-Za-z_]+)\s*$")
_SIZE_BASE = re.compile(rf"^\s*([A-Za-z_]+)\s*(?:([+-])\s*({_NUM})\s*([A-Za-z]*))?\s*$")
SIZE_HELP = "expected NUMBER[unit], NUMBER*BASE or BASE[+|-NUMBER[unit]] (e.g. 48MiB, 0.9*limit)"


class SizeError(ValueError):
    """A size or limits text that cannot be read; ``pos``/``length`` point at the culprit."""

    def __init__(self, problem: str, text: str, pos: int = 0, length: int = 1) -> None:
        super().__init__(problem)
        self.problem = problem
        self.text = text
        self.pos = max(0, pos)
        self.length = max(1, length)


def suggest(word: str, choices: Any) -> str:
    """``"; did you mean 'x'?"`` for a near miss, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unit(unit: str, text: str) -> int:
    if not unit:
        return 1
    try:
        return SIZE_UNITS[unit.lower()]
    except KeyError:
        raise SizeError(
            f"unknown size unit {unit!r}; expected one of {', '.join(UNIT_NAMES)}"
            f"{suggest(unit, UNIT_NAMES)}",
            text,
            text.find(unit),
            len(unit),
        ) from None


def _base(name: str, text: str, baselines: Mapping[str, int] | None, relative: bool) -> int:
    if name not in SIZE_BASES:
        raise SizeError(
            f"unknown size base {name!r}; expected one of {', '.join(SIZE_BASES)}"
            f"{suggest(name, SIZE_BASES)}",
            text,
            text.find(name),
            len(name),
        )
    if baselines is None:
        if relative:
            return 0
        raise SizeError(
            f"size {text.strip()!r} is relative to {name!r}, which is only known inside the "
            "server; write an absolute size such as 24GB or 512MiB here",
            text,
            text.find(name),
            len(name),
        )
    if name not in baselines:
        raise SizeError(
            f"size base {name!r} is not known here (have: {', '.join(baselines) or 'none'}); "
            "resolve sizes inside the server or pass the baseline",
            text,
            text.find(name),
            len(name),
        )
    return int(baselines[name])


def _evaluate(text: str, baselines: Mapping[str, int] | None, relative: bool) -> int:
    if m := _SIZE_NUM.match(text):
        return int(float(m.group(1)) * _unit(m.group(2), text))
    if m := _SIZE_MUL.match(text):
        return int(float(m.group(1)) * _base(m.group(2), text, baselines, relative))
    if m := _SIZE_BASE.match(text):
        value = _base(m.group(1), text, baselines, relative)
        if not m.group(2):
            return value
        delta = int(float(m.group(3)) * _unit(m.group(4), text))
        return value + delta if m.group(2) == "+" else value - delta
    raise SizeError(f"malformed size {text.strip()!r}; {SIZE_HELP}", text, 0, len(text))


def parse_size(text: str | int, baselines: Mapping[str, int] | None = None) -> int:
    """Bytes of a size: ``24GB``, ``1.5G``, ``512MiB``, a bare byte count, or (with
    ``baselines``) ``0.9*limit`` / ``active+2GiB`` resolved against MLX's counters.

    Without ``baselines`` only absolute sizes are accepted.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise SizeError(f"size {text!r} is not a number of bytes", str(text))
    if isinstance(text, int):
        value, text = text, str(text)
    else:
        value = _evaluate(text, baselines, relative=False)
    if value < 0:
        raise SizeError(
            f"size {text.strip()!r} resolves to {value} bytes (< 0); pick a larger base or "
            "a smaller offset",
            text,
            0,
            len(text),
        )
    return value


def check_size(text: str) -> None:
    """Check a size expression's form (units, bases) where the counters are not known yet."""
    _evaluate(text, None, relative=True)


def parse_limits(text: str) -> dict[str, str]:
    """``"wired=0.8*limit,memory=16GiB"`` -> ``{"wired": "0.8*limit", "memory": "16GiB"}``.

    Every size is checked for form here (:func:`check_size`); its bytes are resolved where
    the counters are known (inside the server) with :func:`parse_size`.
    """
    values: dict[str, str] = {}
    offset = 0
    for raw in text.split(","):
        part = raw.strip()
        pos = offset + (len(raw) - len(raw.lstrip()))
        offset += len(raw) + 1
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in LIMIT_KEYS:
            raise SizeError(
                f"invalid limits: part {part!r} is not wired=SIZE or memory=SIZE"
                f"{suggest(key, LIMIT_KEYS) if eq else ''} "
                "(e.g. 'wired=0.8*limit,memory=16GiB')",
                text,
                pos,
                len(part),
            )
        if key in values:
            raise SizeError(f"invalid limits: {key!r} is given twice", text, pos, len(part))
        try:
            check_size(value.strip())
        except SizeError as exc:
            raise SizeError(exc.problem, text, pos + len(key) + 1 + exc.pos, exc.length) from None
        values[key] = value.strip()
    return values


def format_bytes(n: float) -> str:
    """Human size in decimal GB/MB (the units mlx_lm.server logs use)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GB:
        return f"{sign}{n / GB:.2f} GB"
    if n >= MB:
        return f"{sign}{n / MB:.1f} MB"
    if n >= KB:
        return f"{sign}{n / KB:.1f} KB"
    return f"{sign}{int(n)} B"


def kv_bytes_per_token(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
) -> int:
    """KV-cache bytes one token adds across all layers, as mlx-lm's caches store them.

    Unquantized: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes. With ``kv_bits``
    (``QuantizedKVCache``) each head row packs into ``head_dim * bits / 8`` bytes plus one
    scale and one bias (in the activation dtype) per ``kv_group_size`` values.
    """
    if kv_bits is None:
        row = head_dim * dtype_bytes
    else:
        if kv_bits not in KV_BITS:
            raise ValueError(
                f"kv_bits {kv_bits} is not supported by MLX: use one of "
                f"{', '.join(map(str, KV_BITS))}"
            )
        if kv_group_size <= 0 or head_dim % kv_group_size:
            raise ValueError(
                f"head_dim {head_dim} is not a multiple of kv_group_size {kv_group_size}; "
                "MLX cannot quantize this cache"
            )
        row = head_dim * kv_bits // 8 + 2 * (head_dim // kv_group_size) * dtype_bytes
    return 2 * layers * kv_heads * row
