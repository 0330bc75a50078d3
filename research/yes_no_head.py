"""How well does a VQA run's auxiliary yes/no classifier (``yes_no_aux_weight``) answer easy-vqa **test** yes/no
questions, and is it reading the image or only the wording? Loads a training checkpoint of the run (the
classifier is never exported), scores the yes/no questions among the first N test questions, and splits them by
polarity and right answer. Answering plain questions "no" and negated ones "yes" without looking at the image is
right ~85% of the time on easy-vqa, so only the two rare cells (plain/yes, negated/no) show an image being read.

    python -m research.yes_no_head runs/research/vqa_qformer [--step 600] [--questions 600]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from blip2.encoders import build_encoder

from training import yes_no
from training.config import Stage2Config, load_config
from training.data import EasyVQAQuestions
from training.metrics import NEGATION
from training.stage2_init import build, encoder_spec_of


class _NoLLM:
    """Stands in for the frozen LLM: the classifier never uses it (only its hidden size, for the projection)."""

    def __init__(self, hidden_size: int = 576):
        self.config = type("Config", (), {"hidden_size": hidden_size, "is_encoder_decoder": False})()

    def requires_grad_(self, flag):
        return self

    def eval(self):
        return self


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a VQA run's output_dir (config.yaml + checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="training checkpoint step (default: the latest)")
    parser.add_argument("--questions", type=int, default=600, help="first N easy-vqa test questions (default 600)")
    args = parser.parse_args(argv)

    run = Path(args.run)
    cfg = load_config(run / "config.yaml", [], Stage2Config)
    if not cfg.yes_no_aux_weight:
        raise SystemExit(f"{run} trained no yes/no classifier (yes_no_aux_weight is 0).")
    folder = run / "checkpoints" / (f"step_{args.step:08d}" if args.step else
                                     (run / "checkpoints" / "latest").read_text().strip())
    questions = EasyVQAQuestions("test")
    test = [t for t in (questions[i] for i in range(min(args.questions, len(questions))))
            if t["answer"] in ("yes", "no")]
    encoder = build_encoder(encoder_spec_of(cfg)).freeze()
    with torch.no_grad():
        features = torch.cat([encoder(encoder.preprocess([t["image"] for t in test[i:i + 64]]))
                              for i in range(0, len(test), 64)])
    model, _, _ = build(cfg, _NoLLM(), 0, features.shape[-1])
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{folder} does not fit the run's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    cells: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(test), 64):
            chunk = test[i:i + 64]
            out = model.query_outputs(features[i:i + 64], model.qformer_text([t["question"] for t in chunk]))
            predicted = model.yes_no_head(out.mean(dim=1)).argmax(-1).tolist()
            for p, t in zip(predicted, chunk):
                cell = f"{'negated' if NEGATION.search(t['question']) else 'plain'}/{t['answer']}"
                right = cells.setdefault(cell, [0, 0])
                right[0] += int(p == yes_no.CLASSES[t["answer"]])
                right[1] += 1
    total = sum(r[1] for r in cells.values())
    wording = sum(r[1] for cell, r in cells.items() if cell in ("plain/no", "negated/yes"))
    print(json.dumps({
        "checkpoint": str(folder), "yes_no_questions": total,
        "accuracy": round(100 * sum(r[0] for r in cells.values()) / total, 1),
        "wording_only_accuracy": round(100 * wording / total, 1),
        "by_polarity_and_answer": {cell: f"{r[0]}/{r[1]} ({100 * r[0] / r[1]:.0f}%)" for cell, r in sorted(cells.items())},
    }, indent=2))


if __name__ == "__main__":
    main()
