"""``python -m training <command>``: fetch-data | stage1 | stage2 | finetune | eval | eval-retrieval.

    python -m training stage1 --config training/configs/stage1_tiny.yaml [key=value ...] [--resume]
    python -m training stage2 --config training/configs/stage2_tiny.yaml   # starts from runs/stage1_tiny/stage1
    python -m training finetune --task vqa --config ... init_from=runs/stage2/checkpoint
    python -m training eval --task vqa --checkpoint runs/vqa/checkpoint --data easyvqa:test
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m training stage1 --config ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, Stage1Config, Stage2Config, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="command", required=True)
    fd = sub.add_parser("fetch-data", help="download the emoji data sets from the npm registry into the data cache")
    fd.add_argument("sources", nargs="*", help="which (default: all): emoji-google, emoji-twitter, openmoji")
    fd.add_argument("--cache", help="data cache folder (default: $BLIP2_DATA_CACHE or ~/.cache/blip2/data)")
    fd.add_argument("--force", action="store_true", help="download again even if already in the cache")
    s1 = sub.add_parser("stage1", help="Q-Former representation learning (ITC + ITM + ITG)")
    s1.add_argument("--config", help="YAML config (see training/configs/)")
    s1.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    s1.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 output_dir=runs/x")
    s2 = sub.add_parser("stage2", help="generative pre-training: soft visual prompts into a frozen LLM")
    ft = sub.add_parser("finetune", help="fine-tune: caption | vqa (stage-2 engine) or retrieval (stage-1 objectives)")
    ft.add_argument("--task", required=True, choices=("caption", "vqa", "retrieval"))
    for p in (s2, ft):
        p.add_argument("--config", help="YAML config (see training/configs/)")
        p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. init_from=DIR output_dir=runs/x")
    eva = sub.add_parser("eval", help="evaluate a checkpoint: caption (BLEU-4, CIDEr) | vqa (VQA accuracy) | retrieval")
    eva.add_argument("--task", required=True, choices=("caption", "vqa", "naming", "chat", "retrieval"))
    eva.add_argument("--checkpoint", required=True, help="blip2 checkpoint (caption, vqa) or stage-1 folder (retrieval)")
    eva.add_argument("--data", required=True, help="easyvqa:test | scenes:N[:SEED] | tuxpaint:test[:concept] | "
                     "emoji:test | photos | manifest path")
    eva.add_argument("--output", help="folder for the results JSON (default: runs/eval/<run name>)")
    eva.add_argument("--limit", type=int, help="evaluate only the first N examples (smoke runs)")
    eva.add_argument("--skip", type=int, default=0,
                     help="vqa: leave out the first N questions, e.g. those used to choose a recipe (results go to "
                          "eval_vqa_fromN.json)")
    eva.add_argument("--protocol", choices=("paper", "greedy"), default="paper",
                     help="decoding: the paper's (VQA: beam 5, length penalty -1; captions: beam 5) or greedy")
    eva.add_argument("--k", type=int, default=128, help="retrieval: ITM re-ranks the ITC top k")
    eva.add_argument("--batch-size", type=int, default=64)
    ev = sub.add_parser("eval-retrieval", help="image<->text retrieval: ITC ranking, then ITM re-ranking of the top k")
    ev.add_argument("--checkpoint", required=True, help="stage-1 checkpoint folder")
    ev.add_argument("--data", required=True, help="scenes:N[:SEED] | tuxpaint:test | easyvqa:test | manifest path")
    ev.add_argument("--k", type=int, default=128, help="ITM re-ranks the ITC top k (paper: 128)")
    ev.add_argument("--output", help="folder for retrieval.json (default: runs/eval/<run name>)")
    ev.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "eval" and (args.skip < 0 or (args.skip and args.task != "vqa")):
        parser.error(f"--skip {args.skip}: a count of questions to leave out, with --task vqa only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    try:
        if args.command == "fetch-data":
            from pathlib import Path

            from .data.fetch import fetch

            try:
                fetch(args.sources or None, Path(args.cache) if args.cache else None, force=args.force)
            except ValueError as exc:  # an unknown source name
                raise ConfigError(str(exc)) from exc
        elif args.command == "stage1":
            from .stage1 import run

            run(load_config(args.config, args.overrides, Stage1Config), resume=args.resume)
        elif args.command == "stage2" or (args.command == "finetune" and args.task != "retrieval"):
            from .stage2 import run

            cfg = load_config(args.config, args.overrides, Stage2Config)
            if args.command == "finetune":
                cfg.task = args.task
            run(cfg, resume=args.resume)
        elif args.command == "finetune":  # retrieval: the stage-1 objectives from a stage-1 Q-Former
            from .stage1 import run

            cfg = load_config(args.config, args.overrides, Stage1Config)
            if cfg.qformer.init != "checkpoint":
                raise ConfigError("finetune --task retrieval starts from a stage-1 Q-Former: set "
                                  "qformer.init=checkpoint qformer.checkpoint=<stage-1 folder>.")
            run(cfg, resume=args.resume)
        elif args.command == "eval" and args.task != "retrieval":
            from .evaluate import evaluate_cli

            evaluate_cli(args)
        else:
            from .retrieval import evaluate_cli

            evaluate_cli(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
