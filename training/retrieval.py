"""Image<->text retrieval with a stage-1 Q-Former (paper §4.4): rank every pair by ITC similarity, then re-rank
each query's top k by ITM (paper: k = 128) with score = ITM match logit + ITC similarity, as LAVIS does.

Recall@K counts a query as hit when any correct item is in its top K; items sharing an image id (several captions
of one picture) are all correct, and so are items of the same concept (emoji: one concept drawn in two styles) or,
for sources without concepts, with the very same caption text.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blip2.encoders import build_encoder

from .data import iter_items
from .data.sources import build_source, parse_data_arg
from .evaluate import results_dir
from .qformer_init import tokenize
from .stage1_checkpoint import TOKENIZER_DIR, load_stage1

logger = logging.getLogger(__name__)
RECALL_AT = (1, 5, 10)


def recall_at(scores: torch.Tensor, correct: torch.Tensor, ks=RECALL_AT) -> dict[str, float]:
    """scores (Nq, Nc); correct (Nq, Nc) bool. Percent of queries with a correct candidate in the top k."""
    order = scores.argsort(dim=1, descending=True)
    hits = correct.gather(1, order)
    return {f"R@{k}": float(hits[:, :k].any(1).float().mean() * 100) for k in ks}


def chance_recall(correct: torch.Tensor, ks=RECALL_AT) -> dict[str, float]:
    """Expected Recall@K of a random ranking: per query 1 - P(none of its c right items among k of n drawn)."""
    n = correct.shape[1]
    c = correct.sum(1).double()
    out = {}
    for k in ks:
        miss = torch.ones_like(c)
        for j in range(min(k, n)):
            miss = miss * ((n - c - j).clamp(min=0) / (n - j))
        out[f"R@{k}"] = float((1 - miss).mean() * 100)
    return out


@torch.no_grad()
def rerank(scores: torch.Tensor, k: int, pair_score) -> torch.Tensor:
    """Replace each row's top-k scores by pair_score(row, columns) (+ the ITC score); others drop below them."""
    out = torch.full_like(scores, -1e4)
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    for row in tqdm(range(scores.shape[0]), desc="ITM re-rank", leave=False):
        cols = top[row]
        out[row, cols] = pair_score(row, cols) + scores[row, cols]
    return out


@torch.no_grad()
def evaluate(model, tokenizer, encoder, items: list[dict], k: int = 128, batch_size: int = 64, max_length: int = 32) -> dict:
    model.eval()
    texts = [it["text"] for it in items]
    image_ids = [it["id"] for it in items]
    # Unique images (an image with several captions is encoded once).
    unique = list(dict.fromkeys(image_ids))
    first = {image_id: n for n, image_id in reversed(list(enumerate(image_ids)))}
    t0 = time.perf_counter()
    embeds = []
    for start in range(0, len(unique), batch_size):
        chunk = [items[first[i]]["image"] for i in unique[start:start + batch_size]]
        embeds.append(encoder(encoder.preprocess(chunk)))
    image_embeds = torch.cat(embeds)  # (I, N, D)
    image_feats = torch.cat([model.itc_features(image_embeds[s:s + batch_size], *_dummy_text(tokenizer, len(image_embeds[s:s + batch_size])))[0]
                             for s in range(0, len(image_embeds), batch_size)])  # (I, Q, E)
    tokens = tokenize(tokenizer, texts, max_length)
    text_feats = torch.cat([
        model.itc_features(image_embeds[:1].expand(len(tokens["input_ids"][s:s + batch_size]), -1, -1),
                           tokens["input_ids"][s:s + batch_size], tokens["attention_mask"][s:s + batch_size])[1]
        for s in range(0, len(texts), batch_size)
    ])  # (T, E)
    itc_i2t = torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1)  # (I, T)
    # Right pairs: the same image, or a caption of the same thing (the same concept where the source names one,
    # else the very same text): "A cat." under another style of the same emoji is no wrong answer.
    keys = [it.get("concept") or it["text"] for it in items]
    keys_of: dict[str, set] = {}
    for image_id, key in zip(image_ids, keys):
        keys_of.setdefault(image_id, set()).add(key)
    correct = torch.tensor([[image_ids[t] == unique[i] or keys[t] in keys_of[unique[i]] for t in range(len(texts))]
                            for i in range(len(unique))])

    def itm_i2t(row, cols):
        logits = model.itm_logits(image_embeds[row:row + 1].expand(len(cols), -1, -1),
                                  tokens["input_ids"][cols], tokens["attention_mask"][cols])
        return logits[:, 1]

    def itm_t2i(row, cols):
        logits = model.itm_logits(image_embeds[cols], tokens["input_ids"][row:row + 1].expand(len(cols), -1),
                                  tokens["attention_mask"][row:row + 1].expand(len(cols), -1))
        return logits[:, 1]

    results = {
        "images": len(unique), "texts": len(texts), "k": k,
        "chance_R@1": 100.0 / len(unique),  # one right item per query; "chance" below counts them all
        "chance": {"image_to_text": chance_recall(correct), "text_to_image": chance_recall(correct.t())},
        "itc": {"image_to_text": recall_at(itc_i2t, correct), "text_to_image": recall_at(itc_i2t.t(), correct.t())},
    }
    results["itc+itm"] = {
        "image_to_text": recall_at(rerank(itc_i2t, k, itm_i2t), correct),
        "text_to_image": recall_at(rerank(itc_i2t.t(), k, itm_t2i), correct.t()),
    }
    results["seconds"] = time.perf_counter() - t0
    return results


def _dummy_text(tokenizer, n: int):
    """itc_features computes both sides; for the image side the text is irrelevant (unimodal mask)."""
    tokens = tokenize(tokenizer, ["."] * n, 4)
    return tokens["input_ids"], tokens["attention_mask"]


def evaluate_cli(args) -> dict:
    from transformers import AutoTokenizer

    checkpoint = Path(args.checkpoint)
    model, config = load_stage1(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR)
    encoder = build_encoder(config["encoder"]).freeze()
    spec = parse_data_arg(args.data)
    items = list(iter_items(build_source(spec)))
    if len(items) < 2:
        raise FileNotFoundError(f"{args.data}: fewer than two usable image-text pairs.")
    logger.info("retrieval on %d pairs from %s (ITM re-ranks the top %d)", len(items), args.data, args.k)
    results = evaluate(model, tokenizer, encoder, items, k=args.k, batch_size=args.batch_size)
    results.update(checkpoint=str(checkpoint), data=args.data)
    output = Path(args.output) if args.output else results_dir(checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    name = "retrieval-" + args.data.replace("/", "_").replace(":", "-") + ".json"
    (output / name).write_text(json.dumps(results, indent=2))
    for mode in ("itc", "itc+itm"):
        for direction, recalls in results[mode].items():
            print(f"{mode:8s} {direction:14s} " + "  ".join(f"{k} {v:5.1f}" for k, v in recalls.items()))
    for direction, recalls in results["chance"].items():
        print(f"{'chance':8s} {direction:14s} " + "  ".join(f"{k} {v:5.1f}" for k, v in recalls.items()))
    print(f"written to {output / name}")
    return results
