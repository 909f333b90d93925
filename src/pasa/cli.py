"""The ``pasa`` command line.

- ``pasa demo``: the testbed video demo (dense vs PASA from the same seed) on the shipped
  checkpoint or ``--checkpoint``; if the shipped file is missing (a source tree without it), the
  attention-level demo on synthetic video Q/K/V.
- ``pasa attention-demo``: routing strategies on synthetic video attention (torch only).
- ``pasa eval``: the quality / flicker suite on the testbed.
- ``pasa train``, ``pasa probe``: train the testbed model; its attention recall per layer.
- ``pasa info``: versions and which backends run here.
"""

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


def _attention_demo(args: argparse.Namespace) -> int:
    from pasa.demo import main

    return main(args)


def _shipped_checkpoint_exists() -> bool:
    from pathlib import Path

    return (Path(__file__).parent / "testbed" / "checkpoint" / "testbed.safetensors").is_file()


def _demo(args: argparse.Namespace) -> int:
    if args.checkpoint is None and not _shipped_checkpoint_exists():
        print(
            "pasa demo: the shipped testbed checkpoint is missing (pass --checkpoint PATH for the "
            "video demo); running the attention-level demo on synthetic video Q/K/V instead.\n"
        )
        fallback = argparse.Namespace(
            grid=[8, 32, 48],
            heads=4,
            dim=64,
            layers=3,
            density=args.density,
            seed=args.seed,
            json=None,
            no_progress=args.no_progress,
        )
        return _attention_demo(fallback)
    from pasa.testbed.video_demo import run_from_args

    return run_from_args(args)


def _eval(args: argparse.Namespace) -> int:
    from pasa.eval.suite import run_from_args

    return run_from_args(args)


# Subcommands whose own parser takes every argument after the name: ``module.main(argv)``.
FORWARDED = {
    "train": ("pasa.testbed.train", "train the testbed model (torchrun for several GPUs)"),
    "probe": ("pasa.eval.probe", "attention recall per layer of a testbed checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pasa", description="Precision-Allocated Sparse Attention"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from pasa.eval.suite import add_arguments as eval_arguments
    from pasa.testbed.video_demo import add_arguments as demo_arguments

    demo = sub.add_parser("demo", help="dense vs PASA video from the testbed model (main job)")
    demo_arguments(demo).set_defaults(func=_demo)

    att = sub.add_parser("attention-demo", help="routing strategies on synthetic video attention")
    att.add_argument("--grid", type=int, nargs=3, default=[8, 32, 48], metavar=("F", "H", "W"))
    att.add_argument("--heads", type=int, default=4)
    att.add_argument("--dim", type=int, default=64)
    att.add_argument("--layers", type=int, default=3, help="independent inputs averaged")
    att.add_argument("--density", type=float, default=0.15)
    att.add_argument("--seed", type=int, default=0)
    att.add_argument("--json", help="also write the results to this JSON file")
    att.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    att.set_defaults(func=_attention_demo)

    ev = sub.add_parser("eval", help="quality and flicker of every strategy on the testbed")
    eval_arguments(ev).set_defaults(func=_eval)

    for name, (_, text) in FORWARDED.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; main() forwards

    info = sub.add_parser("info", help="versions and which backends run here")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in FORWARDED:
        import importlib

        return importlib.import_module(FORWARDED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
