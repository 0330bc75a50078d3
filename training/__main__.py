"""``python -m training <command>``: stage1 | eval-retrieval.

    python -m training stage1 --config training/configs/stage1_tiny.yaml [key=value ...] [--resume]
    accelerate launch --num_processes 2 --cpu -m training stage1 --config ...
    python -m training eval-retrieval --checkpoint runs/stage1/stage1 --data tuxpaint:test
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="command", required=True)
    s1 = sub.add_parser("stage1", help="Q-Former representation learning (ITC + ITM + ITG)")
    s1.add_argument("--config", help="YAML config (see training/configs/)")
    s1.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    s1.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 output_dir=runs/x")
    ev = sub.add_parser("eval-retrieval", help="image<->text retrieval: ITC ranking, then ITM re-ranking of the top k")
    ev.add_argument("--checkpoint", required=True, help="stage-1 checkpoint folder")
    ev.add_argument("--data", required=True, help="scenes:N[:SEED] | tuxpaint:test | easyvqa:test | manifest path")
    ev.add_argument("--k", type=int, default=128, help="ITM re-ranks the ITC top k (paper: 128)")
    ev.add_argument("--output", help="folder for retrieval.json (default: the checkpoint's run folder)")
    ev.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    try:
        if args.command == "stage1":
            from .stage1 import DEFAULTS, run

            run(load_config(args.config, args.overrides, DEFAULTS), resume=args.resume)
        else:
            from .retrieval import evaluate_cli

            evaluate_cli(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
