"""The ``hzo-ext`` command (also ``python -m hzo_ext``)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hzo-ext", description="Hierarchical zeroth-order gradient estimation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build diagnostics: torch/CUDA versions, kernels present")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import format_info
        print(format_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
