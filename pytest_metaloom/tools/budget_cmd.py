"""``metaloom budget``: the command-line face of :mod:`pytest_metaloom.tools.budget`.

Exit codes: 0 the workload fits under the wired ceiling, 1 it crosses, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from pytest_metaloom.tools.budget import (
    DEFAULT_CONTEXT,
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_PROMPT_CACHE_SIZE,
    DEFAULT_TOKENS_PER_TURN,
    BudgetError,
    BudgetInputs,
    compute_budget,
    format_report,
    inputs_from_model_dir,
    parse_size,
    resolve_ceiling,
)

EXIT_FITS = 0
EXIT_CROSSES = 1


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", nargs="?", help="MLX model directory (safetensors)"
    )
    given = parser.add_argument_group("numbers instead of a model directory")
    given.add_argument("--weights-bytes", type=_size, metavar="SIZE", help="e.g. 16GB")
    given.add_argument("--kv-bytes-per-token", type=float, metavar="N")
    work = parser.add_argument_group("server settings and workload")
    work.add_argument("--prompt-cache-bytes", type=_size, metavar="SIZE")
    work.add_argument(
        "--prompt-cache-size", type=int, default=DEFAULT_PROMPT_CACHE_SIZE, metavar="N"
    )
    work.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="N")
    work.add_argument("--concurrent", type=int, default=1, metavar="N")
    work.add_argument("--kv-bits", type=int, metavar="N")
    work.add_argument("--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE, metavar="N")
    work.add_argument("--tokens-per-turn", type=int, default=DEFAULT_TOKENS_PER_TURN, metavar="N")
    work.add_argument("--overhead", type=_size, default=0, metavar="SIZE")
    ceiling = parser.add_argument_group("wired ceiling")
    ceiling.add_argument("--wired-limit-mb", type=int, metavar="N")
    ceiling.add_argument("--ram", type=_size, metavar="SIZE", help="RAM for the macOS default")
    ceiling.add_argument(
        "--platform",
        choices=("darwin", "linux"),
        default=sys.platform if sys.platform in ("darwin", "linux") else "linux",
        help="whose rules find the ceiling (darwin reads sysctl); default: this machine",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.epilog = "exit codes: 0 fits, 1 crosses the wired ceiling, 2 bad input"


def _inputs(args: argparse.Namespace) -> BudgetInputs:
    ceiling = resolve_ceiling(args.wired_limit_mb, ram_bytes=args.ram, platform=args.platform)
    common = dict(
        ceiling=ceiling,
        prompt_cache_bytes=args.prompt_cache_bytes,
        prompt_cache_size=args.prompt_cache_size,
        context=args.context,
        concurrent=args.concurrent,
        tokens_per_turn=args.tokens_per_turn,
        overhead_bytes=args.overhead,
    )
    direct = args.weights_bytes is not None or args.kv_bytes_per_token is not None
    if args.model_dir is not None and direct:
        raise BudgetError("give either MODEL_DIR or --weights-bytes/--kv-bytes-per-token, not both")
    if args.model_dir is not None:
        return inputs_from_model_dir(
            args.model_dir, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, **common
        )
    if args.weights_bytes is None or args.kv_bytes_per_token is None:
        raise BudgetError(
            "no model: pass MODEL_DIR, or both --weights-bytes SIZE and --kv-bytes-per-token N"
        )
    return BudgetInputs(
        weights_bytes=args.weights_bytes, kv_bytes_per_token=args.kv_bytes_per_token, **common
    )


def run(args: argparse.Namespace) -> int:
    report = compute_budget(_inputs(args))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return EXIT_FITS if report.fits else EXIT_CROSSES
