"""The single table of metaloom settings.

Each setting exists as a command-line option and as an ini key, registered from the
same row with the same description. Values resolve in this order: an explicit factory
argument, the command line, the environment (``PYTEST_METALOOM_<NAME>``), the ini file, the
default. This module imports nothing heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    default: Any = None
    kind: str = "string"  # string | bool | float | int | list (repeatable) | csv
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def ini(self) -> str:
        name = self.flag.lstrip("-")
        if not name.startswith("metaloom-"):
            name = "metaloom-" + name
        return name.replace("-", "_")

    @property
    def env(self) -> str:
        # Not METALOOM_*: servers inherit the environment and the in-server injector
        # reads METALOOM_FAULTS etc.; a matrix filter must never arm a fault.
        return "PYTEST_" + self.ini.upper()


TURN_WORDS: dict[str, int] = {"metal": 120, "cuda": 1400}
"""Words of tool output a real-device tool-loop turn adds when --metaloom-turn-words is 0,
per backend (CUDA: about 9.4k tokens a turn with the built-in model's tokenizer)."""

OPTIONS: tuple[Option, ...] = (
    Option("--metal-oom", "Collect and run the built-in Metal OOM scenario matrix.", False, "bool"),
    Option(
        "--metaloom-model",
        "Use this MLX model directory for every metaloom server instead of the built-in "
        "tiny offline model.",
        metavar="PATH",
    ),
    Option(
        "--metaloom-url",
        "Point the metaloom fixtures at a server that is already running (nothing is "
        "started or stopped).",
        metavar="URL",
    ),
    Option(
        "--metaloom-server",
        "Server profile: a built-in name (mlx_lm, rapid-mlx, vllm-mlx, mlx-openai-server) or "
        "the path of a profile .toml; gives the command, probes, paths and evidence.",
        metavar="NAME",
    ),
    Option(
        "--metaloom-server-cmd",
        "Server command line to run instead of mlx_lm.server (e.g. a wrapper or supervisor); "
        "may use {python}, {host}, {port}, {model} placeholders.",
        metavar="CMD",
    ),
    Option(
        "--metaloom-server-args",
        "Extra arguments appended to the server command line.",
        metavar="ARGS",
    ),
    Option(
        "--metaloom-start-timeout",
        "Seconds to wait for the server to answer /health.",
        60.0,
        "float",
    ),
    Option(
        "--metaloom-ready-timeout",
        "Seconds to wait for the warm-up completion that proves the model is loaded.",
        120.0,
        "float",
    ),
    Option(
        "--metaloom-stop-timeout",
        "Seconds between SIGTERM and SIGKILL when stopping a server tree.",
        10.0,
        "float",
    ),
    Option(
        "--metaloom-log-lines",
        "Lines of server log shown in a failing test's report.",
        40,
        "int",
    ),
    Option(
        "--metaloom-faults",
        "Comma-separated fault kinds the matrix runs (default: all).",
        kind="csv",
        metavar="KINDS",
    ),
    Option(
        "--metaloom-semantics",
        "Comma-separated command-buffer semantics the matrix runs: abort, deferred, sync.",
        kind="csv",
        metavar="LIST",
    ),
    Option(
        "--metaloom-paths",
        "Comma-separated generation paths the matrix runs: batched, sequential.",
        kind="csv",
        metavar="LIST",
    ),
    Option(
        "--metaloom-sites",
        "Comma-separated injection sites the matrix runs: prefill, decode, cache.",
        kind="csv",
        metavar="LIST",
    ),
    Option(
        "--metaloom-stream",
        "Stream modes the matrix runs: stream, nostream (comma-separated).",
        kind="csv",
        metavar="LIST",
    ),
    Option(
        "--metaloom-full-matrix",
        "Run the full cross product of kinds x semantics x paths x stream x sites.",
        False,
        "bool",
    ),
    Option("--metaloom-seed", "Seed for probabilistic faults and scenario order.", 0, "int"),
    Option(
        "--metaloom-deadline",
        "Longest seconds any one request may take; a request that makes no progress "
        "for the stall bound counts as hung sooner.",
        60.0,
        "float",
    ),
    Option(
        "--metaloom-stall-floor",
        "Smallest stall bound in seconds: a request that gets no byte while the server "
        "uses no CPU for the bound is hung. The bound is the multiplier times the server's "
        "measured one-token latency, never below this floor; the matrix's guard hang "
        "timeout is four times the bound.",
        2.0,
        "float",
    ),
    Option(
        "--metaloom-stall-multiplier",
        "Stall bound = this many times the worst recent one-token latency of the server.",
        20.0,
        "float",
    ),
    Option(
        "--metaloom-allow-unproven",
        "Let 'unproven' scenarios (no failure seen, but a witness missing, e.g. no usage "
        "counts from the server) pass instead of failing.",
        False,
        "bool",
    ),
    Option(
        "--metaloom-report",
        "Write the JSON report of every scenario to this path.",
        metavar="PATH",
    ),
    Option(
        "--metaloom-patch-set",
        "A patch set to verify: 'stock', a .diff/.patch file, or a directory with "
        "patchset.toml (repeatable; each runs against its own server).",
        kind="list",
        metavar="SPEC",
    ),
    Option(
        "--metaloom-allow-version-mismatch",
        "Warn instead of failing when a patch set's base mlx-lm version differs from the "
        "installed one.",
        False,
        "bool",
    ),
    Option(
        "--metaloom-guard",
        "Run every matrix scenario with the server behind metaloom-guard.",
        False,
        "bool",
    ),
    Option(
        "--metaloom-real-metal",
        "Real Metal mode (Apple Silicon only): no simulation; lower the real limits and "
        "drive load until MLX fails for real.",
        False,
        "bool",
    ),
    Option(
        "--metaloom-real-device",
        "Real-device mode (a GPU MLX can use): no simulation; make memory scarce for real "
        "(Metal: lowered MLX limits; CUDA: a helper process holds all but "
        "--metaloom-headroom) and drive the tool loop until MLX's allocator fails by itself.",
        False,
        "bool",
    ),
    Option(
        "--metaloom-headroom",
        "With --metaloom-real-device on CUDA: GPU memory the headroom helper leaves free.",
        "3GiB",
        metavar="SIZE",
    ),
    Option(
        "--metaloom-headroom-cmd",
        "With --metaloom-real-device on CUDA: command line of the headroom helper (it speaks "
        "the JSON-lines protocol of pytest_metaloom.server.headroom; default: that module "
        "run with this Python).",
        metavar="CMD",
    ),
    Option(
        "--metaloom-turn-words",
        "With --metaloom-real-device: words of tool output each tool-loop turn adds "
        f"(0: {TURN_WORDS['metal']} on Metal, {TURN_WORDS['cuda']} on CUDA, about 9.4k tokens).",
        0,
        "int",
    ),
    Option(
        "--metaloom-max-turns",
        "With --metaloom-real-device or --metaloom-real-metal: tool-loop turns driven before a "
        "run in which nothing failed for real counts as not fired.",
        24,
        "int",
    ),
    Option(
        "--metaloom-model-spec",
        "Size of the built-in offline model: a preset (tiny, large) or ModelSpec fields, "
        "e.g. 'layers=8,hidden_size=1024' (default tiny; large for real-device on CUDA).",
        metavar="SPEC",
    ),
    Option(
        "--metaloom-sysctl",
        "With --metaloom-real-metal: also lower iogpu.wired_limit_mb with sudo sysctl "
        "(restored at teardown).",
        False,
        "bool",
    ),
)

BY_DEST = {option.dest: option for option in OPTIONS}


def default(dest: str) -> Any:
    """The default of option ``dest``: this table is the one home of every option default
    (``Settings`` and the server timeouts read it from here)."""
    return BY_DEST[dest].default


def convert(option: Option, value: Any) -> Any:
    """Turn a raw string (ini or environment) into the option's type."""
    if value is None or value == "" or value == []:
        return [] if option.kind in ("list", "csv") else option.default
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        return str(value).strip().lower() in {"1", "true", "yes", "on"}
    if option.kind in ("float", "int"):
        try:
            return float(value) if option.kind == "float" else int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{option.flag} (ini {option.ini}, env {option.env}) needs a "
                f"{'number' if option.kind == 'float' else 'whole number'}, got {value!r}"
            ) from None
    if option.kind == "csv":
        if isinstance(value, (list, tuple)):
            value = ",".join(value)
        return [part.strip() for part in str(value).split(",") if part.strip()]
    if option.kind == "list":
        if isinstance(value, str):
            return value.split()
        return list(value)
    return value


def resolve(dest: str, cli_value: Any, ini_value: Any, *, explicit: Any = None) -> Any:
    """Factory argument > command line > environment > ini > default."""
    option = BY_DEST[dest]
    if explicit is not None:
        return convert(option, explicit)
    empty_cli = cli_value is None or (option.kind in ("bool",) and cli_value is False)
    if option.kind == "list" and not cli_value:
        empty_cli = True
    if not empty_cli:
        return convert(option, cli_value)
    env_value = os.environ.get(option.env)
    if env_value not in (None, ""):
        return convert(option, env_value)
    if ini_value not in (None, "", []):
        return convert(option, ini_value)
    return convert(option, None)
