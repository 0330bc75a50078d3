"""Decoding settings and the reply-only n-gram ban, against an explicit brute-force definition."""


import numpy as np
import pytest
import torch

from blip2.decoding import MAX_BEAMS, MAX_NEW_TOKENS, MAX_SEED, Decoding, ReplyNoRepeatNGram


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


@pytest.mark.parametrize("name, value", [
    ("num_beams", 1000), ("num_beams", MAX_BEAMS + 1), ("num_beams", 2.0), ("num_beams", True),
    ("max_new_tokens", "10"), ("max_new_tokens", 10.5), ("max_new_tokens", True),
    ("max_new_tokens", MAX_NEW_TOKENS + 1),
    ("min_new_tokens", "1"), ("min_new_tokens", 1.0), ("min_new_tokens", -1),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.7"),
    ("top_p", float("nan")), ("length_penalty", float("nan")), ("length_penalty", float("-inf")),
    ("repetition_penalty", float("inf")), ("repetition_penalty", float("nan")), ("repetition_penalty", -1.0),
    ("top_k", 2.5), ("top_k", "5"), ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 2.5),
    ("seed", 2**70), ("seed", MAX_SEED + 1), ("seed", -1), ("seed", 1.5), ("seed", "42"), ("seed", True),
    ("do_sample", "false"),
])
def test_invalid_settings_are_value_errors_naming_the_setting(name, value):
    # From keyword arguments, as model.chat/ask/generate/stream build them.
    with pytest.raises(ValueError, match=name):
        Decoding.from_kwargs(**{name: value})


def test_boundary_settings_are_accepted_as_plain_python_values():
    settings = Decoding(num_beams=np.int64(MAX_BEAMS), max_new_tokens=MAX_NEW_TOKENS, seed=MAX_SEED, temperature=1,
                        length_penalty=-1, top_k=np.int32(5))
    assert (settings.num_beams, settings.seed, settings.top_k) == (MAX_BEAMS, MAX_SEED, 5)
    assert type(settings.num_beams) is int and type(settings.temperature) is float
    torch.manual_seed(settings.seed)  # the largest accepted seed is one torch takes


def test_unknown_setting_named():
    with pytest.raises(TypeError, match="Unknown decoding setting.*beams"):
        Decoding.from_kwargs(beams=3)


def test_sampling_kwargs_only_when_sampling():
    greedy = Decoding().generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    sampled = Decoding(do_sample=True, temperature=0.7, top_p=0.8).generate_kwargs()
    assert (sampled["temperature"], sampled["top_p"]) == (0.7, 0.8)
    assert "logits_processor" not in Decoding(no_repeat_ngram_size=0).generate_kwargs()
