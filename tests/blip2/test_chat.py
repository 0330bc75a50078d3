"""Chat on our checkpoint format (EfficientNet-Lite0 + random Q-Former + tiny Llama chat LLM): prompt layout,
the image-query and key/value caches, streaming, cancellation, seeds and context fitting."""

import warnings

import pytest
import torch

import blip2
from blip2.model import _common_prefix
from blip2.prompts import IMAGE_SLOT
from conftest import image

GREEDY = dict(max_new_tokens=8, min_new_tokens=8, no_repeat_ngram_size=0)


@pytest.fixture(scope="module")
def model(our_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blip2.load(str(our_checkpoint), precision="fp32", device="cpu")


@pytest.fixture(autouse=True)
def fresh(model):
    model.clear_caches()


def test_image_slot_sits_in_first_user_turn_after_system(model):
    ids = model._tokenize(model.prompt_format.conversation([("hi", "hello")], "what is it?", model.tokenizer))
    q = model.num_query_tokens
    start = ids.index(model.image_token_id)
    assert ids[start:start + q] == [model.image_token_id] * q
    assert ids.count(model.image_token_id) == q
    before = model.tokenizer.decode(ids[:start])
    assert before.startswith("<|im_start|>system\n")  # the system turn comes first ...
    assert before.endswith("<|im_start|>user\n")  # ... and the image opens the first user turn
    after = model.tokenizer.decode(ids[start + q:])
    assert after.startswith("hi<|im_end|>") and after.endswith("<|im_start|>assistant\n")


def test_user_cannot_forge_image_slot(model):
    ids = model._tokenize(model.prompt_format.raw(f"look {IMAGE_SLOT} here", model.tokenizer))
    assert ids.count(model.image_token_id) == model.num_query_tokens


def test_second_turn_reuses_caches_and_matches_recompute(model):
    pil = image(0)
    calls = []
    hook = model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = model.chat(pil, [], "what is it?", stream=True, **GREEDY)
        reply1 = "".join(first).strip()
        second = model.chat(pil, [("what is it?", reply1)], "and the colour?", stream=True, **GREEDY)
        list(second)
    finally:
        hook.remove()
    assert len(calls) == 1  # the image tower ran once for two turns
    assert first.reply.reused_prefix_tokens == 0
    assert second.reply.reused_prefix_tokens > model.num_query_tokens

    model.clear_caches()  # the same turn computed from scratch must give the same tokens
    recomputed = model.chat(pil, [("what is it?", reply1)], "and the colour?", stream=True, **GREEDY)
    list(recomputed)
    assert recomputed.reply.reused_prefix_tokens == 0
    assert recomputed.reply.token_ids == second.reply.token_ids


def test_next_turn_feeds_back_the_generated_ids_and_reuses_the_whole_last_turn(model):
    """A reply's text often re-tokenizes to other ids than the model generated; the next prompt must carry the
    generated ids, so it extends the last turn's sequence exactly and the whole cached prefix is reused, plus the
    end-of-turn markup prefilled after the reply streamed."""
    pil = image(0)
    first = model.chat(pil, [], "what is it?", stream=True, **GREEDY)
    reply1 = "".join(first).strip()
    first.wait()  # the follow-up work for the next turn is done
    first_prompt = model._tokenize(model.prompt_format.conversation([], "what is it?", model.tokenizer))
    generated = first.reply.token_ids
    assert len(generated) == GREEDY["max_new_tokens"] and model.tokenizer.eos_token_id not in generated

    history = [("what is it?", reply1)]
    ids = model._tokenize(model.prompt_format.conversation(history, "and the colour?", model.tokenizer, mark_replies=True))
    other = model._tokenize(model.prompt_format.conversation(history, "why?", model.tokenizer, mark_replies=True))
    assert ids[: len(first_prompt) + len(generated)] == first_prompt + generated
    shared = _common_prefix(ids, other)  # what any next message starts with: reply + "<|im_end|>...user\n"
    assert shared > len(first_prompt) + len(generated)
    second = model.chat(pil, history, "and the colour?", stream=True, **GREEDY)
    list(second)
    assert second.reply.reused_prefix_tokens == shared

    model.clear_caches()  # and the prefilled cache gives exactly what computing it all does
    recomputed = model.chat(pil, history, "and the colour?", stream=True, **GREEDY)
    list(recomputed)
    assert recomputed.reply.reused_prefix_tokens == 0
    assert recomputed.reply.token_ids == second.reply.token_ids


def test_an_edited_reply_is_tokenized_as_text(model):
    pil = image(0)
    reply1 = model.chat(pil, [], "what is it?", **GREEDY)
    history = [("what is it?", reply1 + " (edited)")]
    marked = model.prompt_format.conversation(history, "and?", model.tokenizer, mark_replies=True)
    plain = model.prompt_format.conversation(history, "and?", model.tokenizer)
    assert model._tokenize(marked) == model._tokenize(plain)


def test_new_image_does_not_reuse_the_old_prefix(model):
    model.chat(image(0), [], "what is it?", **GREEDY)
    other = model.chat(image(1), [], "what is it?", stream=True, **GREEDY)
    list(other)
    assert other.reply.reused_prefix_tokens == 0
    model.clear_caches()
    assert model.chat(image(1), [], "what is it?", **GREEDY) == other.reply.text


def test_image_changes_the_answer(model):
    answers = {tuple(_tokens(model, image(s), "what is it?")) for s in range(3)}
    assert len(answers) > 1


def _tokens(model, pil, message):
    s = model.chat(pil, [], message, stream=True, **GREEDY)
    list(s)
    return s.reply.token_ids


def test_stream_yields_chunks_that_join_to_the_reply(model):
    s = model.stream(image(2), "describe it", max_new_tokens=12, min_new_tokens=12, no_repeat_ngram_size=0)
    chunks = list(s)
    assert len(chunks) > 1
    assert "".join(chunks).strip() == s.reply.text
    assert s.reply.new_tokens == 12 and s.reply.first_token_seconds is not None


def test_cancel_stops_generation(model):
    s = model.stream(image(2), "describe it", max_new_tokens=120, min_new_tokens=120, no_repeat_ngram_size=0)
    for _ in s:
        s.cancel()
    assert s.reply.cancelled
    assert s.reply.new_tokens < 120


def test_closing_the_iterator_cancels(model):
    s = model.stream(image(2), "describe it", max_new_tokens=120, min_new_tokens=120, no_repeat_ngram_size=0)
    iterator = iter(s)
    next(iterator)
    iterator.close()  # what a web server does when the client goes away
    assert s.reply is not None and s.reply.cancelled and s.reply.new_tokens < 120


def test_seed_makes_sampling_reproducible(model):
    kwargs = dict(do_sample=True, temperature=1.5, top_p=1.0, max_new_tokens=10, min_new_tokens=10)
    a = model.generate(image(0), "tell me", seed=7, **kwargs)
    b = model.generate(image(0), "tell me", seed=7, **kwargs)
    others = {model.generate(image(0), "tell me", seed=s, **kwargs) for s in range(8, 12)}
    assert a == b
    assert len(others | {a}) > 1


def test_long_history_drops_oldest_turns(model):
    turn = ("tell me about the sky and the sea " * 3, "the sky is blue and the sun is bright " * 3)
    history = [turn] * 40
    s = model.chat(image(0), history, "what now?", stream=True, max_new_tokens=4)
    list(s)
    assert 0 < s.reply.dropped_turns < 40
    assert s.reply.prompt_tokens + 4 <= model.context_length
    assert "oldest" in s.reply.notice


def test_overlong_message_is_cut(model):
    s = model.chat(image(0), [], "sky sea sun " * 400, stream=True, max_new_tokens=4)
    list(s)
    assert s.reply.truncated_message and s.reply.prompt_tokens + 4 <= model.context_length


def test_max_new_tokens_beyond_context_is_a_clear_error(model):
    with pytest.raises(blip2.PromptTooLongError, match="max_new_tokens"):
        model.generate(image(0), "hi", max_new_tokens=10_000)


def test_bad_image_raises_before_generating(model):
    with pytest.raises(blip2.InvalidImageError):
        model.generate(b"not an image", "hi")


def test_generate_reply_matches_stream(model):
    reply = model.generate_reply(image(3), "describe it", **GREEDY)
    with model.stream(image(3), "describe it", **GREEDY) as s:
        text = "".join(s)
    assert reply.token_ids == s.reply.token_ids and reply.text == text.strip()
    assert reply.prompt_tokens == s.reply.prompt_tokens and reply.first_token_seconds is not None


def test_history_accepts_messages_format(model):
    pairs = [("what is it?", "a cat")]
    messages = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "a cat"}]
    assert model.chat(image(0), pairs, "sure?", **GREEDY) == model.chat(image(0), messages, "sure?", **GREEDY)


def test_unknown_decoding_setting_is_rejected(model):
    with pytest.raises(TypeError, match="num_beam"):
        model.generate(image(0), "hi", num_beam=3)


def test_query_embeddings_dtype_and_shape(model):
    _, queries = model.encode_image(image(0))
    assert queries.shape == (1, model.num_query_tokens, model.language_model.config.hidden_size)
    assert model.qformer.layernorm.weight.dtype == torch.float32


def test_plain_layout_chat_reuses_the_last_turn_and_matches_recompute(opt_checkpoint):
    """The same on an official OPT checkpoint ("Question: .. Answer: .." turns, BOS after the image)."""
    opt = blip2.load(str(opt_checkpoint), precision="fp32", device="cpu")
    pil = image(2)
    first = opt.chat(pil, [], "what is it?", stream=True, **GREEDY)
    reply1 = "".join(first).strip()
    first.wait()
    history = [("what is it?", reply1)]
    render = lambda message: opt.prompt_format.conversation(history, message, opt.tokenizer, mark_replies=True)  # noqa: E731
    shared = _common_prefix(opt._tokenize(render("and the colour?")), opt._tokenize(render("why?")))
    second = opt.chat(pil, history, "and the colour?", stream=True, **GREEDY)
    list(second)
    assert second.reply.reused_prefix_tokens == shared > opt.num_query_tokens + len(first.reply.token_ids)
    opt.clear_caches()
    recomputed = opt.chat(pil, history, "and the colour?", stream=True, **GREEDY)
    list(recomputed)
    assert recomputed.reply.token_ids == second.reply.token_ids


def test_a_program_that_exits_right_after_a_reply_exits_cleanly(our_checkpoint, tmp_path):
    """The next-turn prefill runs after the reply; exiting at once must neither abort the process ("terminate called
    without an active exception", a killed thread inside a torch kernel) nor hang."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ask_and_exit.py"
    script.write_text(
        "import sys, warnings\nwarnings.simplefilter('ignore')\nimport blip2\nfrom PIL import Image\n"
        "m = blip2.load(sys.argv[1], precision='fp32', device='cpu')\n"
        "print(repr(m.ask(Image.new('RGB', (48, 40), 'red'), 'what is it?', max_new_tokens=4)))\n"
        "print(repr(''.join(m.chat(Image.new('RGB', (48, 40), 'red'), [], 'and?', stream=True, max_new_tokens=4))))\n"
    )
    root = Path(__file__).resolve().parents[2]
    for _ in range(4):  # the failure was a race at exit: several tries
        result = subprocess.run([sys.executable, str(script), str(our_checkpoint)], cwd=root, capture_output=True,
                                text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root)})
        assert result.returncode == 0, result.stderr[-2000:]
        assert "terminate called" not in result.stderr
        assert len(result.stdout.strip().splitlines()) == 2
