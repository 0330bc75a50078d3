"""Can ITM learn on the naming data at all, and what stops it in stage 1?

Continues a stage-1 checkpoint for a few steps on stage1_naming.yaml's data (its feature cache), with AdamW at the
recipe's rates (MiniLM's weights at a tenth), and prints the ITM loss every 10 steps:

- ``--losses itm``: ITM alone;
- ``--losses all``: ITC + ``--itm-weight`` x ITM + ITG, as stage 1 sums them.

``--negatives uniform`` draws ITM negatives uniformly among the other pairs of the batch (easy), ``hard`` by ITC
similarity (the paper). The 1:2 label prior, where ITM sat in every stage-1 run, is 0.637 (docs/training.md,
"Held-out retrieval").

    python -m research.itm_alone --losses itm --negatives uniform      # 0.41 after 50 steps
    python -m research.itm_alone --losses all --negatives uniform      # 0.632: does not move
    python -m research.itm_alone --losses all --itm-weight 10 --steps 40
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from blip2.encoders import build_encoder
    from training.config import Stage1Config, load_config
    from training.data import ConcatPairs
    from training.data.sources import build_source
    from training.engine import make_accelerator
    from training.features import cached_dataset, collate_features
    from training.qformer_init import set_losses, tokenize
    from training.sampling import repeat_by_source
    from training.stage1 import image_key
    from training.stage1_checkpoint import TOKENIZER_DIR, load_stage1

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/stage1_naming/stage1")
    parser.add_argument("--config", default="training/configs/stage1_naming.yaml", help="its data and feature cache")
    parser.add_argument("--losses", choices=("itm", "all"), default="itm")
    parser.add_argument("--negatives", choices=("uniform", "hard"), default="uniform")
    parser.add_argument("--itm-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = load_config(args.config, [], Stage1Config)
    checkpoint = Path(args.checkpoint)
    model, config = load_stage1(checkpoint)
    # Uniform negatives: similarities scaled by step / ramp, with a ramp no run reaches.
    set_losses(model, replace(cfg.loss, itm_negatives_ramp=10**9 if args.negatives == "uniform" else 0,
                              itm_weight=args.itm_weight))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR)
    encoder = build_encoder(config["encoder"]).freeze()
    dataset = ConcatPairs([build_source(s) for s in cfg.data.sources])
    features, _ = cached_dataset(dataset, encoder, cfg.data, Path(cfg.output_dir) / "features", make_accelerator())
    features = repeat_by_source(features, cfg.data.repeat)

    def pretrained(name: str) -> bool:  # what qformer.init=bert loaded (training.qformer_init.load_bert_weights)
        return "crossattention" not in name and any(
            k in name for k in ("embeddings.", "qformer.layernorm", ".attention.", "intermediate", ".output."))

    named = list(model.named_parameters())
    scale = cfg.optim.pretrained_lr_scale
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if pretrained(n)], "lr": args.lr * scale},
        {"params": [p for n, p in named if not pretrained(n)], "lr": args.lr},
    ], weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    model.train()
    generator = torch.Generator().manual_seed(0)
    history: list[tuple[float, float, float]] = []
    start = time.perf_counter()
    print(f"{len(features)} pairs; losses {args.losses}, {args.negatives} negatives, ITM weight {args.itm_weight}")
    for step in range(args.steps):
        rows = torch.randint(len(features), (args.batch_size,), generator=generator).tolist()
        batch = collate_features([features[i] for i in rows])
        tokens = tokenize(tokenizer, batch["texts"], cfg.qformer.max_text_length)
        image_ids = torch.tensor([image_key(i) for i in batch["ids"]])
        losses = model(batch["image_embeds"].float(), tokens["input_ids"], tokens["attention_mask"],
                       image_ids=image_ids, step=step)
        loss = losses.itm if args.losses == "itm" else losses.loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        history.append((losses.itc.item(), losses.itm.item(), losses.itg.item()))
        if (step + 1) % 10 == 0:
            itc, itm, itg = (sum(h[k] for h in history[-10:]) / 10 for k in range(3))
            print(f"step {step + 1}: ITM {itm:.3f}  (ITC {itc:.3f}, ITG {itg:.3f})  "
                  f"{(step + 1) / (time.perf_counter() - start):.2f} steps/s", flush=True)


if __name__ == "__main__":
    main()
