"""Where an evaluation comes from: its site (prefill, decode, cache) and path.

MLX can fail only where it evaluates or synchronizes (``mx.eval``, ``mx.async_eval``,
``array.item``, ``array.tolist``, ``mx.synchronize``). Each such call in mlx-lm is named
here by the function that makes it and, where one function has calls of several kinds,
by the text of the calling line. ``stands_for`` records the real line in mlx-lm 0.32.2
and 0.31.3; ``tests/test_sites.py`` checks those lines against the installed source.
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

SEQUENTIAL = frozenset(
    {
        "generate_step",
        "speculative_generate_step",
        "stream_generate",
        "ResponseGenerator._serve_single",
    }
)
BATCHED_CLASSES = frozenset({"BatchGenerator", "GenerationBatch", "PromptProcessingBatch"})


def qualname(frame: FrameType) -> str:
    """``Class.method`` of a frame (``co_qualname`` on 3.11+, rebuilt from ``self`` before)."""
    code = frame.f_code
    qn = getattr(code, "co_qualname", None)
    if qn:
        return qn
    this = frame.f_locals.get("self")
    return f"{type(this).__name__}.{code.co_name}" if this is not None else code.co_name


def _called_from(name: str) -> Callable[[FrameType], bool]:
    def check(frame: FrameType) -> bool:
        return frame.f_back is not None and qualname(frame.f_back) == name

    return check


def _first_token(frame: FrameType) -> bool:
    return frame.f_locals.get("n") == 0


@dataclass(frozen=True)
class Rule:
    """An evaluation in ``qualname`` (on a line containing ``needle``, if given) is ``site``."""

    site: str
    qualname: str
    needle: str = ""
    when: Callable[[FrameType], bool] | None = None
    # (mlx-lm version, "file:line") of the real call this rule stands for
    stands_for: tuple[tuple[str, str], ...] = ()

    def matches(self, frame: FrameType) -> bool:
        if self.needle:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            if self.needle not in line:
                return False
        return self.when is None or self.when(frame)


_STATE_EVAL = "mx.eval([c.state for c in"

RULES: tuple[Rule, ...] = (
    # -- cache: evaluations of prompt-cache state, and cache extraction that evaluates.
    # The real CUDA out-of-memory of mlx-oom-facts section 8 was raised from the first
    # of these (batched) and from generate_step's (sequential).
    Rule(
        "cache",
        "PromptProcessingBatch.prompt",
        _STATE_EVAL,
        stands_for=(
            ("0.32.2", "generate.py:1229"),
            ("0.32.2", "generate.py:1237"),
            ("0.31.3", "generate.py:1161"),
            ("0.31.3", "generate.py:1169"),
        ),
    ),
    Rule(
        "cache",
        "generate_step",
        _STATE_EVAL,
        stands_for=(("0.32.2", "generate.py:450"), ("0.31.3", "generate.py:442")),
    ),
    Rule(
        "cache",
        "speculative_generate_step.<locals>._prefill",
        _STATE_EVAL,
        stands_for=(("0.32.2", "generate.py:592"), ("0.31.3", "generate.py:584")),
    ),
    Rule(
        "cache",
        "BatchKVCache.extract",
        stands_for=(
            ("0.32.2", "models/cache.py:1049"),
            ("0.32.2", "models/cache.py:1050"),
            ("0.31.3", "models/cache.py:1082"),
        ),
    ),
    Rule(
        "cache",
        "BatchRotatingKVCache.extract",
        stands_for=(
            ("0.32.2", "models/cache.py:1393"),
            ("0.32.2", "models/cache.py:1395"),
            ("0.32.2", "models/cache.py:1396"),
            ("0.31.3", "models/cache.py:1418"),
            ("0.31.3", "models/cache.py:1420"),
            ("0.31.3", "models/cache.py:1421"),
        ),
    ),
    Rule(
        "cache",
        "BatchKVCache.filter",
        stands_for=(("0.32.2", "models/cache.py:993"), ("0.31.3", "models/cache.py:1027")),
    ),
    # -- prefill: the step over the last prompt token, which yields the first token.
    Rule(
        "prefill",
        "GenerationBatch._step",
        when=_called_from("GenerationBatch.__init__"),
        stands_for=(
            ("0.32.2", "generate.py:1434"),
            ("0.32.2", "generate.py:1439"),
            ("0.31.3", "generate.py:1369"),
            ("0.31.3", "generate.py:1374"),
        ),
    ),
    Rule(
        "prefill",
        "generate_step",
        "mx.async_eval(y, logprobs)",
        stands_for=(("0.32.2", "generate.py:466"), ("0.31.3", "generate.py:455")),
    ),
    Rule(
        "prefill",
        "generate_step",
        "mx.eval(y)",
        stands_for=(("0.32.2", "generate.py:474"), ("0.31.3", "generate.py:462")),
    ),
    Rule(
        "prefill",
        "generate_step",
        "y.item()",
        when=_first_token,
        stands_for=(("0.32.2", "generate.py:478"), ("0.31.3", "generate.py:466")),
    ),
    Rule(
        "prefill",
        "ResponseGenerator._serve_single",
        "mx.eval(input_embeddings)",
        stands_for=(("0.32.2", "server.py:1092"),),
    ),
    # -- decode: every later step.
    Rule(
        "decode",
        "GenerationBatch._step",
        stands_for=(
            ("0.32.2", "generate.py:1434"),
            ("0.32.2", "generate.py:1439"),
            ("0.32.2", "generate.py:1440"),
            ("0.31.3", "generate.py:1369"),
            ("0.31.3", "generate.py:1374"),
            ("0.31.3", "generate.py:1375"),
        ),
    ),
    Rule(
        "decode",
        "generate_step",
        "mx.async_eval(next_y, next_logprobs)",
        stands_for=(("0.32.2", "generate.py:472"), ("0.31.3", "generate.py:460")),
    ),
    Rule(
        "decode",
        "generate_step",
        "y.item()",
        stands_for=(("0.32.2", "generate.py:478"), ("0.31.3", "generate.py:466")),
    ),
    Rule(
        "decode",
        "speculative_generate_step",
        stands_for=(
            ("0.32.2", "generate.py:607"),
            ("0.32.2", "generate.py:629"),
            ("0.32.2", "generate.py:630"),
            ("0.32.2", "generate.py:631"),
            ("0.31.3", "generate.py:599"),
            ("0.31.3", "generate.py:619"),
            ("0.31.3", "generate.py:620"),
            ("0.31.3", "generate.py:621"),
        ),
    ),
    Rule(
        "decode",
        "ResponseGenerator._generate",
        ".item()",
        stands_for=(("0.32.2", "server.py:991"), ("0.31.3", "server.py:891")),
    ),
    Rule(
        "decode",
        "ResponseGenerator._serve_single",
        ".item()",
        stands_for=(("0.32.2", "server.py:1125"), ("0.31.3", "server.py:999")),
    ),
    Rule(
        "decode",
        "_format_top_logprobs",
        stands_for=(
            ("0.32.2", "server.py:518"),
            ("0.32.2", "server.py:519"),
            ("0.31.3", "server.py:431"),
            ("0.31.3", "server.py:432"),
        ),
    ),
)

_BY_QUALNAME: dict[str, tuple[Rule, ...]] = {}
for _rule in RULES:
    _BY_QUALNAME[_rule.qualname] = (*_BY_QUALNAME.get(_rule.qualname, ()), _rule)


@dataclass(frozen=True)
class Location:
    """Site and path of one evaluation, and the mlx-lm line that made it."""

    site: str
    path: str | None
    where: str | None  # "generate.py:1229 PromptProcessingBatch.prompt"


def _in_mlx_lm(frame: FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).startswith("mlx_lm")


def path_of(qn: str) -> str | None:
    if qn in SEQUENTIAL:
        return "sequential"
    if qn.split(".")[0] in BATCHED_CLASSES or qn == "ResponseGenerator._generate":
        return "batched"
    return None


def locate(frame: FrameType | None) -> Location:
    """Walk out from the caller of an evaluation: the innermost mlx-lm rule names the site."""
    site: str | None = None
    where: str | None = None
    path: str | None = None
    while frame is not None and (site is None or path is None):
        if _in_mlx_lm(frame):
            qn = qualname(frame)
            if site is None:
                for rule in _BY_QUALNAME.get(qn, ()):
                    if rule.matches(frame):
                        site = rule.site
                        name = os.path.basename(frame.f_code.co_filename)
                        where = f"{name}:{frame.f_lineno} {qn}"
                        break
            if path is None:
                path = path_of(qn)
        frame = frame.f_back
    return Location(site or "other", path, where)
