"""``metaloom patchset check PATH``: validate a patch set and apply it to a scratch overlay."""

from __future__ import annotations

import argparse

from pytest_metaloom.patchset.check import patchset_check_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check"], help="what to do with the patch set")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="PATH [options]")


def run(args: argparse.Namespace) -> int:
    return patchset_check_main(args.rest)
