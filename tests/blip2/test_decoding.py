"""Decoding settings and the reply-only n-gram ban, against an explicit brute-force definition."""

import itertools

import pytest
import torch

from blip2.decoding import Decoding, ReplyNoRepeatNGram


def brute_force_banned(reply: list[int], n: int) -> set[int]:
    """Token t is banned iff (last n-1 reply tokens + t) already occurs as an n-gram in the reply."""
    seen = {tuple(reply[i:i + n]) for i in range(len(reply) - n + 1)}
    tail = tuple(reply[len(reply) - n + 1:]) if n > 1 else ()
    return {t for t in range(10) if (tail + (t,)) in seen}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_reply_ngram_ban_matches_definition(n):
    rng = torch.Generator().manual_seed(n)
    for _ in range(50):
        prompt = torch.randint(0, 10, (1, 5), generator=rng)
        reply = torch.randint(0, 4, (1, int(torch.randint(0, 9, (1,), generator=rng))), generator=rng)
        processor = ReplyNoRepeatNGram(n)
        processor(prompt, torch.zeros(1, 10))  # first call learns the prompt length
        scores = processor(torch.cat([prompt, reply], 1), torch.zeros(1, 10))
        banned = {int(i) for i in torch.nonzero(torch.isinf(scores[0])).flatten()}
        assert banned == brute_force_banned(reply[0].tolist(), n)


def test_prompt_ngrams_are_not_banned():
    processor = ReplyNoRepeatNGram(2)
    prompt = torch.tensor([[1, 2, 1]])
    processor(prompt, torch.zeros(1, 5))
    scores = processor(torch.tensor([[1, 2, 1, 1]]), torch.zeros(1, 5))
    # (1, 2) is in the prompt but not in the reply [1]: 2 stays allowed.
    assert not torch.isinf(scores).any()


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(num_beams=0), dict(temperature=0), dict(top_p=0), dict(top_p=1.5),
    dict(min_new_tokens=100, max_new_tokens=10), dict(repetition_penalty=0), dict(top_k=-1),
])
def test_invalid_settings(bad):
    with pytest.raises(ValueError):
        Decoding(**bad)


def test_unknown_setting_named():
    with pytest.raises(TypeError, match="Unknown decoding setting.*beams"):
        Decoding.from_kwargs(beams=3)


def test_sampling_kwargs_only_when_sampling():
    greedy = Decoding().generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    sampled = Decoding(do_sample=True, temperature=0.7, top_p=0.8).generate_kwargs()
    assert (sampled["temperature"], sampled["top_p"]) == (0.7, 0.8)
    assert "logits_processor" not in Decoding(no_repeat_ngram_size=0).generate_kwargs()
