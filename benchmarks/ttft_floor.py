"""What a cached chat turn costs, against the LLM forward it cannot avoid (explains bench_inference.py part 2).

A second chat turn on the offline default model reuses every key/value of the first and prefills only the new
question. This prints that turn's time to first token (the same chat calls as bench_inference.py part 2) next to
plain transformers' forward over as many new tokens on a cache of the same length, both on blip2's compute thread,
so blip2's own overhead is the difference; and the forward over fewer tokens, the floor of any cached turn.

    python benchmarks/ttft_floor.py [--precision fp32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

# The same conversation, image and chat calls as bench_inference.py part 2 (which also makes the repository root
# importable when this runs as a script).
from bench_inference import TURN1, TURN2, chat_turn, test_image


def main(argv=None) -> int:
    import torch
    from transformers import DynamicCache

    import blip2
    from blip2 import compute

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    image = test_image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = blip2.load("default", precision=args.precision, device="cpu")

    model.clear_caches()
    first = chat_turn(model, image, [], TURN1, 48, 48)
    history = [(TURN1, first.text, first.token_ids)]
    cached = []
    for _ in range(args.repeats):
        model.clear_caches()
        chat_turn(model, image, [], TURN1, 48, 48)
        cached.append(chat_turn(model, image, history, TURN2, 1))
    reply = cached[-1]
    new_tokens = reply.prompt_tokens - reply.reused_prefix_tokens
    print(f"{model.info.summary()}, {torch.get_num_threads()} threads")
    print(f"cached 2nd turn: {statistics.median(r.first_token_seconds for r in cached) * 1e3:.1f} ms median "
          f"({reply.reused_prefix_tokens} of {reply.prompt_tokens} prompt tokens reused, {new_tokens} new)")

    llm = model.language_model
    dtype = next(llm.parameters()).dtype

    def forward(n_new: int) -> float:
        with torch.inference_mode():
            cache = DynamicCache(config=llm.config)  # filled in place, as blip2 passes it
            llm(inputs_embeds=torch.randn(1, reply.reused_prefix_tokens, llm.config.hidden_size, dtype=dtype),
                cache=cache, use_cache=True)
            ids = torch.randint(0, llm.config.vocab_size, (1, n_new))
            start = time.perf_counter()
            llm(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    for n in sorted({1, new_tokens // 2, new_tokens}):
        times = [compute.run(forward, n) for _ in range(args.repeats)]
        print(f"transformers forward, {n:>2} new tokens on a {reply.reused_prefix_tokens}-token cache: "
              f"{statistics.median(times) * 1e3:.1f} ms median")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
