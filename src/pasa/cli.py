"""The ``pasa`` command line: ``pasa demo`` and ``pasa info``."""

from __future__ import annotations

import argparse
import sys


def _info(_: argparse.Namespace) -> int:
    import torch

    import pasa
    from pasa.backends import available_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"pasa {pasa.__version__}, torch {torch.__version__}, device {device}")
    for name, reason in available_backends(device).items():
        print(f"  backend {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pasa.demo import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pasa", description="Precision-Allocated Sparse Attention"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare routing strategies on synthetic video attention")
    demo.add_argument("--grid", type=int, nargs=3, default=[8, 32, 48], metavar=("F", "H", "W"))
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--layers", type=int, default=3, help="independent inputs averaged")
    demo.add_argument("--density", type=float, default=0.15)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="versions and which backends run here")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
