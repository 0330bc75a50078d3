"""How far the frozen image encoder's features point at the *word* for a concept never trained on.

Zero-shot naming needs the image of a held-out concept to land near that concept's word in the LLM's space. Two
probes on the emoji (training.data.emoji, split by concept), both without the Q-Former and the LLM:

1. **Ridge probe**: a linear map (ridge regression, features standardised) from EfficientNet-Lite0's mean-pooled
   final features to SmolLM2's input embedding of the concept's head word, fitted on the training concepts; for
   each held-out picture, the rank of its word among every concept's word (cosine). Reports top-1/5/10 and chance.
2. **ImageNet labels**: whether the encoder's own top-1 / top-5 ImageNet classes (labels from the Gradio package's
   imagenet_labels.json) contain a word of the picture's name, over all pictures.

    python -m research.word_probe [--lam 1.0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def features(dataset, batch_size: int = 64):
    from blip2.efficientnet import load_efficientnet_lite
    from blip2.encoders import EfficientNetEncoder

    net = load_efficientnet_lite("lite0")
    encoder = EfficientNetEncoder(net, "lite0").freeze()
    pooled, logits = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = [dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))]
            f = net.forward_features(encoder.preprocess(images)).mean((2, 3))
            pooled.append(f)
            logits.append(net._fc(f))
    return torch.cat(pooled).numpy(), torch.cat(logits).numpy()


def main(argv=None) -> dict:
    import gradio
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blip2.offline import converted_smollm2
    from training.data.concepts import concept_words
    from training.data.emoji import EmojiPictures

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lam", type=float, default=1.0, help="ridge strength (times the number of pictures)")
    args = parser.parse_args(argv)
    train, test = EmojiPictures("train", with_colour=False), EmojiPictures("test", with_colour=False)
    head = {r["id"]: concept_words(r["concept"])[-1] for ds in (train, test) for r in ds.records}
    llm_dir = converted_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    table = AutoModelForCausalLM.from_pretrained(llm_dir).get_input_embeddings().weight.detach().float().numpy()

    def embed(word):
        return table[tokenizer(" " + word, add_special_tokens=False)["input_ids"]].mean(0)

    x_train, logits_train = features(train)
    x_test, logits_test = features(test)
    y_train = np.stack([embed(head[r["id"]]) for r in train.records])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    weights = np.linalg.solve(a.T @ a + args.lam * len(a) * np.eye(a.shape[1]), a.T @ y_train)
    words = sorted(set(head.values()))
    bank = np.stack([embed(w) for w in words])
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    predicted = b @ weights
    predicted /= np.linalg.norm(predicted, axis=1, keepdims=True)
    scores = predicted @ bank.T
    truth = np.array([words.index(head[r["id"]]) for r in test.records])
    rank = (scores > scores[np.arange(len(truth)), truth][:, None]).sum(1)
    ridge = {f"top-{k}": float((rank < k).mean() * 100) for k in (1, 5, 10)}
    ridge.update({f"chance top-{k}": 100.0 * k / len(words) for k in (1, 5, 10)})

    labels = json.loads((Path(gradio.__file__).parent / "media_assets" / "data" / "imagenet_labels.json").read_text())
    records = train.records + test.records
    order = np.argsort(-np.concatenate([logits_train, logits_test]), axis=1)[:, :5]
    hit = {1: 0, 5: 0}
    for record, top in zip(records, order):
        words_of = set(concept_words(record["concept"]))
        for k in hit:
            found = {w for i in top[:k] for w in concept_words(labels[i])}
            hit[k] += bool(words_of & found)
    imagenet = {f"top-{k}": 100.0 * v / len(records) for k, v in hit.items()}
    result = {"pictures": {"train": len(train), "test": len(test)}, "words": len(words),
              "ridge_held_out": ridge, "imagenet_label_names_the_picture": imagenet}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
