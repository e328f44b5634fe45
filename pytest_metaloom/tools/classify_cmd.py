"""``metaloom classify LOG``: the command-line face of :mod:`pytest_metaloom.tools.classify`.

Exit codes: 0 no failure found, 1 an OOM or other crash found, 2 unreadable input or usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from pytest_metaloom.tools.classify import Classification, classify_file

EXIT_CLEAN = 0
EXIT_FOUND = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", metavar="LOG", help="server log file, or - for standard input")
    parser.add_argument("--json", action="store_true", help="print the classification as JSON")
    parser.epilog = "exit codes: 0 no failure found, 1 OOM or other crash found, 2 unreadable input"


def render(result: Classification) -> str:
    """Human summary: verdict line, the decisive log line, the advice."""
    if result.kind == "none":
        return f"no failure found\n{result.advice}"
    facts = [f"kind={result.kind}"]
    for name in ("semantics", "outcome", "exit_code", "signal"):
        value = getattr(result, name)
        if value is not None:
            facts.append(f"{name}={value}")
    facts.append(f"oom={'yes' if result.is_oom else 'no'}")
    facts.append(f"confidence={result.confidence}")
    lines = [" ".join(facts)]
    if result.decisive_line is not None:
        lines.append(f"line {result.line_number}: {result.decisive_line}")
    if result.confidence_note:
        lines.append(f"uncertain: {result.confidence_note}")
    lines.append(f"advice: {result.advice}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = classify_file(args.log)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(result))
    return EXIT_CLEAN if result.kind == "none" else EXIT_FOUND
