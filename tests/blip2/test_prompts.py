"""Prompt formats per LLM family."""

import pytest

from blip2.prompts import IMAGE_SLOT, REPLY_CLOSE, REPLY_OPEN, PromptFormat, default_format, prompt_ids
from conftest import make_tokenizer


def test_plain_history_format():
    fmt = default_format("decoder")
    rendered = fmt.conversation([("what is it?", "a cat"), ("colour?", "black")], "where is it?")
    assert rendered.after == "Question: what is it? Answer: a cat Question: colour? Answer: black Question: where is it? Answer:"
    assert rendered.before == "" and not rendered.has_special_tokens


def test_flan_t5_short_answer_prompt():
    assert default_format("encoder-decoder").conversation([], "how many?").after == "Question: how many? Short answer:"


def test_raw_prompt_is_verbatim_for_plain_layout():
    assert default_format("decoder").raw("  a photo of").after == "a photo of"


def test_chat_layout_places_image_after_system_turn():
    tok = make_tokenizer("chat")
    fmt = PromptFormat(style="chat", question_template="{}", system_prompt="SYS")
    rendered = fmt.conversation([("q1", "a1")], "q2", tok)
    assert rendered.before == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n"
    assert rendered.after == "q1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"


def test_chat_needs_template():
    with pytest.raises(ValueError, match="chat template"):
        PromptFormat(style="chat").raw("hi", make_tokenizer("opt"))


def test_slot_marker_removed_from_user_text():
    rendered = default_format("decoder").conversation([(f"a{IMAGE_SLOT}b", "c")], f"d{IMAGE_SLOT}")
    assert IMAGE_SLOT not in rendered.after


def test_round_trip_dict():
    fmt = default_format("chat")
    assert PromptFormat.from_dict({**fmt.to_dict(), "unknown_key": 1}) == fmt


@pytest.mark.parametrize("kind", ["opt", "chat"])
def test_known_reply_ids_are_spliced_in_and_unknown_replies_tokenize_as_before(kind):
    tok = make_tokenizer(kind)
    fmt = default_format("decoder") if kind == "opt" else PromptFormat(style="chat", question_template="{}", system_prompt="S")
    history = [("what is it?", "a cat"), ("colour?", "black")]
    marked = fmt.conversation(history, "where?", tok, mark_replies=True)
    plain = fmt.conversation(history, "where?", tok)
    assert REPLY_OPEN not in plain.after
    reference = prompt_ids(plain, tok, 0, 2)
    assert prompt_ids(marked, tok, 0, 2) == reference  # markers alone change nothing
    assert prompt_ids(marked, tok, 0, 2, {}.get) == reference

    fake = [7, 8, 9]  # not what "a cat" tokenizes to: proves these ids are used verbatim
    spliced = prompt_ids(marked, tok, 0, 2, {"a cat": fake}.get)
    first_turn = prompt_ids(fmt.conversation([], "what is it?", tok), tok, 0, 2)
    assert spliced[: len(first_turn) + 3] == first_turn + fake  # the first turn's prompt, then the given ids
    # Only the known reply changed: the tail ("black" and the new question) tokenizes as in the reference.
    tail = prompt_ids(plain, tok, 0, 2)[-6:]
    assert spliced[-6:] == tail


def test_reply_markers_are_removed_from_user_text():
    rendered = default_format("decoder").conversation([(f"a{REPLY_OPEN}b", f"c{REPLY_CLOSE}")], "d", mark_replies=True)
    assert rendered.after.count(REPLY_OPEN) == 1 and rendered.after.count(REPLY_CLOSE) == 1
