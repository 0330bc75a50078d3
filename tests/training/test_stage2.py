"""Stage 2 / generative fine-tuning: the training inputs equal what blip2 serves, the loss is transformers' own LM
loss on the target tokens only, prefix LM for encoder-decoders, and tiny runs for OPT-, T5- and Llama-like LLMs
whose checkpoints blip2.load opens."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, Blip2QFormerConfig, Blip2QFormerModel
from torch import nn

from blip2.loading import placeholder_token_id
from blip2.prompts import default_format, prompt_ids
from conftest import build_tiny_bert, build_tiny_text_llm
from training.examples import Example, prefix_split
from training.stage2_model import Stage2Model
from training.text import TextBuilder

ROOT = Path(__file__).resolve().parents[2]
Q = 4


@pytest.fixture(scope="module", params=["opt", "t5", "chat"])
def llm(request, tmp_path_factory):
    folder = build_tiny_text_llm(tmp_path_factory.mktemp(f"llm-{request.param}"), request.param)
    cls = AutoModelForSeq2SeqLM if request.param == "t5" else AutoModelForCausalLM
    return request.param, folder, cls.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def family(kind):
    return {"opt": "decoder", "t5": "encoder-decoder", "chat": "chat"}[kind]


def builder_for(kind, tokenizer, max_target_tokens=16):
    return TextBuilder(tokenizer, default_format(family(kind)), placeholder_token_id(tokenizer), Q,
                       kind == "t5", max_target_tokens)


def test_training_prompt_is_what_blip2_serves(llm):
    kind, _, _, tok = llm
    b = builder_for(kind, tok)
    fmt = default_format(family(kind))
    served = prompt_ids(fmt.conversation([], "what color is it?", tok), tok, b.image_token_id, Q)  # Blip2.ask
    ex = b.example("vqa", "what color is it?", "red")
    if kind == "t5":
        assert ex["input_ids"] == served
        assert ex["labels"] == tok("red")["input_ids"] and ex["labels"][-1] == tok.eos_token_id
        return
    n = len(served)
    assert ex["input_ids"][:n] == served  # the served prompt, then the answer
    target = ex["input_ids"][n:]
    assert ex["labels"] == [-100] * n + target  # loss on the answer and eos only
    assert target[-1] == tok.eos_token_id
    text = tok.decode(target[:-1])
    assert text == (" red" if kind == "opt" else "red")  # plain prompts continue after a space


def test_long_targets_are_cut_but_still_end(llm):
    kind, _, _, tok = llm
    ex = builder_for(kind, tok, max_target_tokens=3).example("caption", "", "a very long caption " * 10)
    labels = [t for t in ex["labels"] if t != -100]
    assert len(labels) == 3 and labels[-1] == tok.eos_token_id


def tiny_model(lm, tok, seed=0):
    torch.manual_seed(seed)
    config = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                encoder_hidden_size=8, cross_attention_frequency=1)
    query_tokens = nn.Parameter(torch.randn(1, Q, 16))
    return Stage2Model(query_tokens, Blip2QFormerModel(config), lm, placeholder_token_id(tok)).eval()  # no dropout


def test_loss_is_transformers_lm_loss_on_targets_only(llm):
    kind, _, lm, tok = llm
    model = tiny_model(lm, tok)
    b = builder_for(kind, tok)
    batch = b.collate([b.example("vqa", "is it round?", "yes"), b.example("vqa", "what shape is in the image?", "a big circle")])
    image = torch.randn(2, 5, 8)
    loss_sum, count, *_ = model(image, batch["input_ids"], batch["attention_mask"], batch["labels"])
    # Reference: the same embeddings through transformers with its own labels-based loss (mean over labelled tokens).
    embeds = lm.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.masked_scatter((batch["input_ids"] == model.image_token_id)[..., None], model.soft_prompt(image))
    reference = lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(loss_sum / count) == pytest.approx(float(reference), rel=1e-5)
    expected = sum(len([t for t in r if t != -100]) for r in batch["labels"].tolist())
    assert int(count) == expected


def test_padding_and_prompt_do_not_reach_the_loss(llm):
    kind, _, lm, tok = llm
    if kind == "t5":
        pytest.skip("encoder-decoder: prompt tokens are encoder input, never labels")
    model = tiny_model(lm, tok)
    b = builder_for(kind, tok)
    short = b.collate([b.example("vqa", "is it round?", "yes")])
    padded = b.collate([b.example("vqa", "is it round?", "yes"),
                        b.example("vqa", "what shape is in the image, would you say?", "a circle")])
    image = torch.randn(2, 5, 8)
    one, n1, *_ = model(image[:1], **short)
    two, *_ = model(image[:1], padded["input_ids"][:1], padded["attention_mask"][:1], padded["labels"][:1])
    assert float(one) == pytest.approx(float(two), rel=1e-5) and int(n1) > 0


def test_only_trained_parts_get_gradients(llm):
    kind, _, lm, tok = llm
    model = tiny_model(lm, tok)
    b = builder_for(kind, tok)
    batch = b.collate([b.example("caption", "", "a red circle")])
    loss, count, *_ = model(torch.randn(1, 5, 8), **batch)
    (loss / count).backward()
    assert model.query_tokens.grad is not None and model.language_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())
    assert not any(n.startswith("language_model") for n in model.state_dict())  # referenced, never saved


def test_prefix_split_is_deterministic_and_covers_the_text():
    text = "a small red circle on the left"
    cuts = {prefix_split(text, f"id{i}", seed=0) for i in range(40)}
    assert len(cuts) > 2  # different samples split at different points
    for prefix, suffix in cuts:
        assert prefix and suffix and f"{prefix} {suffix}" == text
    assert prefix_split(text, "id1", 0) == prefix_split(text, "id1", 0)
    assert prefix_split("circle", "x", 0) == ("", "circle")


# -- tiny runs ------------------------------------------------------------------------------------------------
def env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def train(*args):
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(folder):
    with open(Path(folder) / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def stage1_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cache = tmp_path_factory.getbasetemp() / "stage2-features"
    train("stage1", "--config", "training/configs/stage1_tiny.yaml", f"output_dir={out}", f"data.cache_dir={cache}")
    return out / "stage1", cache


def test_instruction_aware_qformer_reads_the_text():
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    from blip2.qformer import run_qformer

    torch.manual_seed(0)
    config = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                encoder_hidden_size=8, cross_attention_frequency=1, use_qformer_text_input=True,
                                vocab_size=50)
    qformer, embeddings = Blip2QFormerModel(config).eval(), Blip2TextEmbeddings(config)
    queries, image = torch.randn(1, Q, 16), torch.randn(2, 5, 8)
    plain = run_qformer(qformer, queries, image)
    reference = qformer(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    assert torch.equal(plain, reference)  # no text: exactly the plain BLIP-2 Q-Former pass
    text = {"input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 7, 9]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    out = run_qformer(qformer, queries, image[:1].expand(2, -1, -1), embeddings, text)
    assert out.shape == (2, Q, 16)
    assert not torch.allclose(out[0], out[1])  # another question, other queries
    padded = {"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    assert torch.allclose(run_qformer(qformer, queries, image[:1], embeddings, padded),
                          run_qformer(qformer, queries, image[:1], embeddings, short), atol=1e-6)  # padding hidden


def test_yes_no_labels_follow_the_answer_of_questions_only():
    from training.yes_no import labels as yes_no_labels

    batch = [{"kind": "vqa", "target": "yes"}, {"kind": "vqa", "target": "No."}, {"kind": "vqa", "target": "red"},
             {"kind": "caption", "target": "no"}]
    assert yes_no_labels(batch).tolist() == [1, 0, -100, -100]


def test_yes_no_head_is_a_classifier_on_the_mean_query_output(llm, monkeypatch):
    """The auxiliary loss is the cross-entropy of head(mean of the query outputs) on the yes/no questions only, and
    the head stays in the graph on a batch without any (distributed training needs every parameter used)."""
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    from training.config import ConfigError
    from training.stage2_model import LMLoss

    kind, _, lm, tok = llm
    with pytest.raises(ConfigError, match="instruction-aware"):
        Stage2Model(nn.Parameter(torch.zeros(1, Q, 16)), tiny_model(lm, tok).qformer, lm, placeholder_token_id(tok),
                    yes_no_head=True)
    torch.manual_seed(0)
    config = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                encoder_hidden_size=8, cross_attention_frequency=1, use_qformer_text_input=True,
                                vocab_size=50)
    model = Stage2Model(nn.Parameter(torch.randn(1, Q, 16)), Blip2QFormerModel(config), lm, placeholder_token_id(tok),
                        Blip2TextEmbeddings(config), yes_no_head=True).eval()
    b = builder_for(kind, tok)
    batch = b.collate([b.example("vqa", "is it round?", "yes"), b.example("vqa", "what colour?", "red"),
                       b.example("vqa", "is it blue?", "no")])
    text = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0], [5, 6, 10]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])}
    image = torch.randn(3, 5, 8)
    out = model(image, **batch, qformer_text=text, yes_no=torch.tensor([1, -100, 0]))
    logits = model.yes_no_head(model.query_outputs(image, text).mean(dim=1))
    reference = -(torch.log_softmax(logits, -1)[0, 1] + torch.log_softmax(logits, -1)[2, 0])
    assert float(out.yes_no_sum) == pytest.approx(float(reference), rel=1e-5) and int(out.yes_no_count) == 2
    lm_only = model(image, **batch, qformer_text=text)  # no labels: the LM loss alone, unchanged
    assert lm_only.yes_no_sum is None and torch.equal(lm_only.lm_sum, out.lm_sum)
    losses = LMLoss(out.lm_sum / out.lm_count, out.yes_no_sum / out.yes_no_count, aux_weight=0.5)
    assert float(losses.loss) == pytest.approx(float(out.lm_sum / out.lm_count + 0.5 * reference / 2), rel=1e-5)
    # lm_loss_weight: 0 - the classifier alone, the LLM never runs (the same trained parts, built without the LM)
    no_lm = Stage2Model(model.query_tokens, model.qformer, lm, placeholder_token_id(tok), model.qformer_embeddings,
                        yes_no_head=True, use_lm=False).eval()
    no_lm.yes_no_head.load_state_dict(model.yes_no_head.state_dict())
    monkeypatch.setattr(lm, "forward", None)  # would raise if called
    skipped = no_lm(image, **batch, qformer_text=text, yes_no=torch.tensor([1, -100, 0]))
    monkeypatch.undo()
    assert float(skipped.lm_sum) == 0 and int(skipped.lm_count) == 0 and torch.equal(skipped.yes_no_sum, out.yes_no_sum)
    none = model(image, **batch, qformer_text=text, yes_no=torch.full((3,), -100))
    assert float(none.yes_no_sum) == 0 and int(none.yes_no_count) == 0
    (none.lm_sum + none.yes_no_sum).backward()
    assert model.yes_no_head.weight.grad is not None and not model.yes_no_head.weight.grad.any()


@pytest.mark.slow
@pytest.mark.parametrize("kind,task", [("opt", "pretrain"), ("t5", "pretrain"), ("chat", "vqa"), ("chat", "vqa-aware")])
def test_tiny_stage2_and_finetune_runs_load_in_blip2(kind, task, stage1_tiny, tmp_path):
    import blip2
    from training.data import Scenes

    stage1, cache = stage1_tiny
    llm = build_tiny_text_llm(tmp_path / "llm", kind)
    out = tmp_path / "run"
    command = ["stage2"] if task == "pretrain" else ["finetune", "--task", "vqa"]
    aware = "qformer_text_input=true" if task == "vqa-aware" else "qformer_text_input=false"
    train(*command, "--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}", f"llm={llm}",
          f"output_dir={out}", f"data.cache_dir={cache}", "train.steps=8", "optim.lr=3e-3", aware)
    curve = losses(out)
    assert len(curve) == 4 and curve[-1] < curve[0]  # it learns
    model = blip2.load(str(out / "checkpoint"), precision="fp32", device="cpu")
    assert not model.info.untrained and model.num_query_tokens == 8
    picture = Scenes(1, seed=5)[0]["image"]
    text = model.ask(picture, "How many shapes are there?", max_new_tokens=4)
    assert isinstance(text, str)
    assert model.instruction_aware == (task == "vqa-aware")
    if task == "vqa-aware":  # the question reaches the queries, and each (image, question) is cached on its own
        key1, q1 = model.encode_image(picture, "How many shapes are there?")
        key2, q2 = model.encode_image(picture, "What color is the circle?")
        assert key1 != key2 and not torch.allclose(q1, q2)
        assert model.encode_image(picture, "How many shapes are there?")[1] is q1
        assert (out / "checkpoint" / "qformer_tokenizer" / "tokenizer.json").exists()
        # In a chat the soft prompt is the first turn's (its message is the instruction), so turn 2 reuses turn 1's
        # key/values, soft prompt included, and answers exactly as a fresh model does.
        model.clear_caches()
        first = model.chat(picture, [], "How many shapes are there?", stream=True, max_new_tokens=3, min_new_tokens=3)
        reply1 = (list(first), first.wait())[1]
        history = [("How many shapes are there?", reply1.text)]
        second = model.chat(picture, history, "What color is the circle?", stream=True, max_new_tokens=3)
        reply2 = (list(second), second.wait())[1]
        assert reply2.reused_prefix_tokens > model.num_query_tokens
        assert list(model._query_cache) == [key1]  # only the first turn's (image, message) was encoded
        model.clear_caches()
        assert model.chat(picture, history, "What color is the circle?", max_new_tokens=3) == reply2.text
    if kind == "opt":  # an instruction-aware fine-tune of this (text-less) stage-2 checkpoint
        from safetensors.torch import load_file

        from training.stage1_checkpoint import load_stage1

        aware_out = tmp_path / "aware"
        train("finetune", "--task", "vqa", "--config", "training/configs/stage2_tiny.yaml",
              f"init_from={out / 'checkpoint'}", f"llm={llm}", f"output_dir={aware_out}", f"data.cache_dir={cache}",
              "qformer_text_input=true", "train.steps=2", "train.log_every=1", "optim.lr=1e-9", "optim.min_lr=1e-9",
              "export.dtype=float32")
        stage2_weights = load_file(out / "checkpoint" / "trained.safetensors")
        aware_weights = load_file(aware_out / "checkpoint" / "trained.safetensors")
        stage1_qformer = load_stage1(stage1)[0].qformer.state_dict()
        # The text FFNs come from stage 1; everything stage 2 trained (attention output projections too) stays.
        text_ffn = [k for k in aware_weights if re.search(r"\.layer\.\d+\.(intermediate|output)\.", k)]
        assert text_ffn and all(torch.allclose(aware_weights[k], stage1_qformer[k[len("qformer."):]]) for k in text_ffn)
        attention_out = [k for k in stage2_weights if "attention.output." in k]
        assert attention_out and all(torch.allclose(aware_weights[k], stage2_weights[k].float(), atol=1e-6)
                                     for k in attention_out)
        assert not all(torch.allclose(stage2_weights[k].float(), stage1_qformer[k[len("qformer."):]], atol=1e-6)
                       for k in attention_out)  # stage 2 did move them: the check above can fail
    if task.startswith("vqa"):  # fine-tuning continues from the checkpoint it wrote
        again = tmp_path / "again"
        train("finetune", "--task", "vqa", "--config", "training/configs/stage2_tiny.yaml",
              f"init_from={out / 'checkpoint'}", f"llm={llm}", f"output_dir={again}", f"data.cache_dir={cache}", aware,
              "train.steps=2", "train.log_every=1", "optim.lr=1e-9", "optim.min_lr=1e-9")
        from safetensors.torch import load_file

        before, after = load_file(out / "checkpoint" / "trained.safetensors"), load_file(again / "checkpoint" / "trained.safetensors")
        assert before.keys() == after.keys()  # starts from what stage 2 wrote (lr ~0: nothing moved)
        assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-2) for k in before)


@pytest.mark.slow
def test_aware_finetune_with_frozen_bert_text_weights_references_them(stage1_tiny, tmp_path):
    """qformer_text_frozen_from: the text positions use a BERT checkpoint's word embeddings and FFNs, untouched by
    training and not stored in the export; blip2 loads them back from that checkpoint; fine-tuning the export
    again keeps them frozen."""
    from safetensors.torch import load_file

    import blip2
    from blip2.bert_text import bert_text_weights, is_text_only_weight

    stage1, cache = stage1_tiny
    bert = build_tiny_bert(tmp_path / "bert", hidden=64, layers=2, intermediate=128)  # stage1_tiny's Q-Former sizes
    llm = build_tiny_text_llm(tmp_path / "llm", "chat")
    out = tmp_path / "run"
    train("finetune", "--task", "vqa", "--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}",
          f"llm={llm}", f"output_dir={out}", f"data.cache_dir={cache}", "train.steps=4", "optim.lr=3e-3",
          "qformer_text_input=true", f"qformer_text_frozen_from={bert}", "export.dtype=float32")
    stored = load_file(out / "checkpoint" / "trained.safetensors")
    assert stored and not [k for k in stored if is_text_only_weight(k)]
    model = blip2.load(str(out / "checkpoint"), precision="fp32", device="cpu")
    state, reference = model.state_dict(), bert_text_weights(str(bert), 2)
    assert all(torch.equal(state[k], v) for k, v in reference.items())  # frozen through training, then referenced
    assert len(model.qformer_tokenizer) == 30522  # BERT's own tokenizer (stage 1's adds [DEC])
    assert model.instruction_aware
    again = tmp_path / "again"  # with the auxiliary yes/no classifier: trained, logged, never exported
    train("finetune", "--task", "vqa", "--config", "training/configs/stage2_tiny.yaml", f"init_from={out / 'checkpoint'}",
          f"llm={llm}", f"output_dir={again}", f"data.cache_dir={cache}", "train.steps=2", "optim.lr=3e-3",
          "qformer_text_input=true", f"qformer_text_frozen_from={bert}", "export.dtype=float32",
          "yes_no_aux_weight=1.0", "train.log_every=1")
    after = load_file(again / "checkpoint" / "trained.safetensors")
    assert after.keys() == stored.keys()
    with open(again / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["loss"]) == pytest.approx(float(r["lm"]) + float(r["yes_no"]), rel=1e-4) for r in rows)
    assert any(float(r["yes_no"]) > 0 for r in rows)
    assert not all(torch.equal(after[k], stored[k]) for k in stored)  # the trained parts did train


@pytest.mark.slow
def test_eva_vit_run_is_also_exported_in_the_official_format(opt_checkpoint, tmp_path):
    """Stage 2 on an official checkpoint's EVA ViT (tiny) with a Q-Former from BERT-style scratch init: the run
    writes official/ that plain transformers loads, and it generates exactly what blip2 serves."""
    import blip2
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from conftest import image

    llm = build_tiny_text_llm(tmp_path / "llm", "opt")
    out = tmp_path / "run"
    encoder = '{type: eva-vit, source: "%s"}' % opt_checkpoint
    train("stage2", "--config", "training/configs/stage2_tiny.yaml", "init_from=null", f"encoder={encoder}",
          "qformer.init=scratch", "qformer.hidden_size=32", "qformer.num_hidden_layers=2", "qformer.num_attention_heads=4",
          "qformer.intermediate_size=64", "qformer.num_query_tokens=4", f"llm={llm}", f"output_dir={out}",
          "train.steps=2", "train.log_every=1", "export.dtype=float32")
    ours = blip2.load(str(out / "checkpoint"), precision="fp32", device="cpu")
    hf = Blip2ForConditionalGeneration.from_pretrained(out / "official").eval()
    processor = Blip2Processor.from_pretrained(out / "official")
    picture = image(3)
    inputs = processor(images=picture, text="Question: what is it? Answer:", return_tensors="pt")
    expected = hf.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)[0, inputs["input_ids"].shape[1]:]
    reply = ours.generate_reply(picture, "Question: what is it? Answer:", max_new_tokens=6, no_repeat_ngram_size=0)
    assert reply.token_ids == expected.tolist()


def test_layer_wise_lr_decay():
    from blip2.encoders import build_encoder
    from training.engine import LoopConfig, param_groups
    from training.vision_finetune import encoder_depth, layer_decay_scale

    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}, pretrained=False)
    depth = encoder_depth(encoder)
    assert depth == 16  # EfficientNet-Lite0's MBConv blocks
    assert layer_decay_scale("vision.net._conv_stem.weight", depth, 0.5) == 0.5 ** 17
    assert layer_decay_scale("vision.net._blocks.0.x.weight", depth, 0.5) == 0.5 ** 16
    assert layer_decay_scale("vision.net._blocks.15.x.weight", depth, 0.5) == 0.5 ** 1
    assert layer_decay_scale("vision.net._conv_head.weight", depth, 0.5) == 1.0
    assert layer_decay_scale("vision.model.encoder.layers.3.mlp.fc1.weight", 4, 0.9) == pytest.approx(0.9)
    model = nn.ModuleDict({"vision": encoder, "proj": nn.Linear(2, 2)})
    groups = param_groups(model, LoopConfig(steps=1, batch_size=1, lr=1.0, weight_decay=0.1),
                          lambda n: layer_decay_scale(n, depth, 0.5) if n.startswith("vision.") else 1.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of[id(model["proj"].weight)] == 1.0 and decay_of[id(model["proj"].bias)] == 0.0
    assert lr_of[id(encoder.net._conv_stem.weight)] == 0.5 ** 17 and decay_of[id(encoder.net._conv_stem.weight)] == 0.1


@pytest.mark.slow
def test_caption_finetune_with_the_image_encoder_unfrozen(stage1_tiny, tmp_path):
    import blip2
    from safetensors.torch import load_file

    from blip2.encoders import build_encoder

    stage1, cache = stage1_tiny
    llm = build_tiny_text_llm(tmp_path / "llm", "opt")
    out = tmp_path / "run"
    train("finetune", "--task", "caption", "--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}",
          f"llm={llm}", f"output_dir={out}", "vision_finetune.enabled=true", "vision_finetune.layer_decay=0.8",
          "data.sources=[{type: scenes, n: 8, seed: 0}]", "train.steps=2", "train.batch_size=4", "train.log_every=1",
          "export.dtype=float32", "optim.lr=1e-3")
    weights = load_file(out / "checkpoint" / "trained.safetensors")
    pretrained = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).state_dict()
    head = "vision.net._conv_head.weight"
    assert head in weights and not torch.equal(weights[head], pretrained["net._conv_head.weight"])  # it trained
    stats = "vision.net._bn1.running_mean"
    assert torch.equal(weights[stats], pretrained["net._bn1.running_mean"])  # BatchNorm statistics stay fixed
    model = blip2.load(str(out / "checkpoint"), precision="fp32", device="cpu")
    assert torch.equal(model.vision.state_dict()["net._conv_head.weight"], weights[head])  # served with its encoder


@pytest.mark.slow
def test_retrieval_finetune_continues_a_stage1_checkpoint(stage1_tiny, tmp_path):
    from training.stage1_checkpoint import load_stage1

    stage1, cache = stage1_tiny
    bad = subprocess.run([sys.executable, "-m", "training", "finetune", "--task", "retrieval", "--config",
                          "training/configs/stage1_tiny.yaml"], cwd=ROOT, capture_output=True, text=True, env=env())
    assert bad.returncode == 2 and "qformer.init=checkpoint" in bad.stderr
    out = tmp_path / "retrieval"
    train("finetune", "--task", "retrieval", "--config", "training/configs/stage1_tiny.yaml", "qformer.init=checkpoint",
          f"qformer.checkpoint={stage1}", f"output_dir={out}", f"data.cache_dir={cache}", "train.steps=2",
          "train.log_every=1", "optim.lr=1e-9", "optim.min_lr=1e-9", "optim.warmup_steps=0")
    before, _ = load_stage1(stage1)
    after, _ = load_stage1(out / "stage1")
    # lr ~0: the fine-tuned Q-Former is the stage-1 one it started from (not a fresh init).
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


@pytest.mark.slow
def test_two_processes_match_one_and_resume_is_exact(stage1_tiny, tmp_path):
    """Same global batch on 2 processes (DDP on CPU) = 1 process; and a run stopped after step 4 and resumed
    continues the same curve."""
    import shutil

    stage1, cache = stage1_tiny
    llm = build_tiny_text_llm(tmp_path / "llm", "chat")
    common = ["--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}", f"llm={llm}",
              f"data.cache_dir={cache}", "train.steps=6", "train.log_every=1", "train.save_every=2", "optim.lr=3e-3",
              "qformer.dropout=0.0"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train("stage2", *common, f"output_dir={one}")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training"]
    result = subprocess.run([*launch, "stage2", *common, f"output_dir={two}", "train.batch_size=4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**env(), "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    train("stage2", *common, f"output_dir={resumed}")  # a full run, cut back to its step-4 checkpoint, resumed

    for step_dir in (resumed / "checkpoints").glob("step_*"):
        if step_dir.name != "step_00000004":
            shutil.rmtree(step_dir)
    (resumed / "checkpoints" / "latest").write_text("step_00000004")
    train("stage2", *common, f"output_dir={resumed}", "--resume")
    assert losses(resumed) == pytest.approx(losses(one), rel=1e-5)


def test_layernorm_image_features_match_the_formula_and_ignore_scale():
    from blip2.qformer import normalize_image_features, run_qformer

    x = torch.randn(2, 5, 8) * 0.1 + 0.03
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(normalize_image_features(x, "layernorm"), expected, atol=1e-5)
    assert normalize_image_features(x, "none") is x
    with pytest.raises(ValueError, match="Unknown image feature"):
        normalize_image_features(x, "batchnorm")
    torch.manual_seed(0)
    config = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                encoder_hidden_size=8, cross_attention_frequency=1)
    qformer, queries = Blip2QFormerModel(config).eval(), torch.randn(1, Q, 16)
    small = run_qformer(qformer, queries, x, image_norm="layernorm")
    assert torch.allclose(small, run_qformer(qformer, queries, x * 10, image_norm="layernorm"), atol=1e-4)
    assert not torch.allclose(small, run_qformer(qformer, queries, x))


def test_repeat_questions_lists_matching_questions_more_often():
    from types import SimpleNamespace

    from training.config import ConfigError
    from training.sampling import repeat_questions

    rows = [(0, "vqa", "What color is the shape?", "red", "a#q0"),
            (0, "vqa", "Is there a circle?", "yes", "a#q1"),
            (0, "caption", "Describe the image.", "A red circle.", "a"),  # a caption mentioning colour: never repeated
            (1, "vqa", "What colour is the square?", "blue", "b#q0"),
            (1, "vqa", "How many red shapes are there?", "one", "b#q1")]
    rows = [Example(*row) for row in rows]
    examples = SimpleNamespace(rows=rows, __len__=lambda: len(rows))
    subset = repeat_questions(examples, {"(?i)colou?r": 3, "(?i)how many": 2, "square": 4})
    listed = [rows[i][4] for i in subset.indices]
    assert {key: listed.count(key) for key in dict.fromkeys(listed)} == {
        "a#q0": 3, "a#q1": 1, "a": 1, "b#q0": 4, "b#q1": 2}  # the largest matching count wins
    assert repeat_questions(examples, {}) is examples
    for bad, message in [({"colou?r(": 2}, "not a regular expression"), ({"color": 0}, "whole number"),
                         ({"color": 1.5}, "whole number"), ({"zebra": 2}, "match(es) no question")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            repeat_questions(examples, bad)


def test_select_questions_keeps_matching_questions_and_drops_captions():
    from training.config import ConfigError
    from training.sampling import select_questions

    rows = [(0, "vqa", "is there a red shape?", "no", "a#q0"),
            (0, "vqa", "is there not a red shape?", "yes", "a#q1"),
            (0, "vqa", "what shape is this?", "circle", "a#q2"),
            (0, "caption", "Describe the image.", "A red circle.", "a")]
    rows = [Example(*row) for row in rows]
    ids = lambda kept: [row[4] for row in kept]  # noqa: E731
    assert select_questions(rows, None, None) is rows
    assert ids(select_questions(rows, r"\bred\b", None)) == ["a#q0", "a#q1"]  # the caption goes too
    assert ids(select_questions(rows, r"\bred\b", r"\bnot\b")) == ["a#q0"]
    assert ids(select_questions(rows, None, r"\bnot\b")) == ["a#q0", "a#q2", "a"]  # captions stay without `only`
    for only, skip, message in [("red(", None, "not a regular expression"), (3, None, "must be a regular expression"),
                                ("zebra", None, "leave no training example")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            select_questions(rows, only, skip)


def test_balance_yes_no_evens_out_answers_per_source_and_polarity():
    from types import SimpleNamespace

    from training.config import ConfigError
    from training.sampling import repeat_questions

    rows = ([(i, "vqa", "is there a red shape?", "no", f"easy-vqa/train/{i}#q0") for i in range(6)]
            + [(6, "vqa", "is there a blue shape?", "yes", "easy-vqa/train/6#q0")]
            + [(i, "vqa", "is there not a circle?", "yes", f"easy-vqa/train/{i}#q1") for i in range(3)]
            + [(3, "vqa", "is there not a square?", "no", "easy-vqa/train/3#q1")]
            + [(7, "vqa", "Is there a red circle?", "yes", "scenes/0/7#q0"),  # another source, already balanced
               (7, "vqa", "Is there a green circle?", "no", "scenes/0/7#q1"),
               (7, "vqa", "What colour is the circle?", "red", "scenes/0/7#q2"),
               (7, "caption", "Describe the image.", "no", "scenes/0/7")])  # a caption is never repeated
    rows = [Example(*row) for row in rows]
    examples = SimpleNamespace(rows=rows, __len__=lambda: len(rows))
    listed = [rows[i][4] for i in repeat_questions(examples, {}, balance_yes_no=True).indices]
    tally = {}
    for i in set(repeat_questions(examples, {}, balance_yes_no=True).indices):
        source, negated = rows[i][4].split("/")[0], " not " in rows[i][2]
        if rows[i][3] in ("yes", "no") and rows[i][1] == "vqa":
            key = (source, negated, rows[i][3])
            tally[key] = tally.get(key, 0) + listed.count(rows[i][4])
    assert tally == {("easy-vqa", False, "no"): 6, ("easy-vqa", False, "yes"): 6,  # the one "yes" listed 6 times
                     ("easy-vqa", True, "yes"): 3, ("easy-vqa", True, "no"): 3,
                     ("scenes", False, "yes"): 1, ("scenes", False, "no"): 1}
    assert listed.count("scenes/0/7#q2") == 1 and listed.count("scenes/0/7") == 1
    # with a rule too, the larger count wins: the colour question 4x, the rare "yes" still 6x
    both = [rows[i][4] for i in repeat_questions(examples, {"(?i)colou?r|blue": 4}, balance_yes_no=True).indices]
    assert both.count("scenes/0/7#q2") == 4 and both.count("easy-vqa/train/6#q0") == 6
    no_yes_no = SimpleNamespace(rows=rows[-2:], __len__=lambda: 2)
    with pytest.raises(ConfigError, match="no yes/no questions"):
        repeat_questions(no_yes_no, {}, balance_yes_no=True)


def test_naming_loss_is_cross_entropy_over_the_name_embeddings(llm, monkeypatch):
    """The naming loss: cosine of the mean projected query output with the LLM's embedding of every training name
    (mean over the name's tokens), over a temperature, cross-entropy on the right name; naming questions only; the
    LLM is not run with lm_loss_weight 0."""
    from training.naming import NameBank, answer_name

    kind, _, lm, tok = llm
    assert answer_name("vqa", "What is this?", "An apple.") == "apple"
    assert answer_name("vqa", "What is in this picture?", "A dog face.") == "dog face"
    assert answer_name("vqa", "What colour is the dog?", "brown") is None
    assert answer_name("caption", "What is this?", "A dog.") is None
    embeddings = lm.get_input_embeddings()
    bank = NameBank(["bowl of soup", "cat", "red couch"], tok, embeddings)
    ids = tok(" bowl of soup", add_special_tokens=False)["input_ids"]
    expected = torch.nn.functional.normalize(embeddings.weight[ids].float().mean(0), dim=0)
    assert torch.allclose(bank.vectors[0], expected, atol=1e-6)
    batch = [{"kind": "vqa", "prompt": "What is this?", "target": "A cat."},
             {"kind": "vqa", "prompt": "What colour?", "target": "red"},
             {"kind": "vqa", "prompt": "What is in this picture?", "target": "A red couch."}]
    labels = bank.labels(batch)
    assert labels.tolist() == [1, -100, 2]
    torch.manual_seed(0)
    model = tiny_model(lm, tok).eval()
    model.set_name_bank(bank.vectors, tau=0.1)
    assert "name_bank" not in model.state_dict()  # never saved
    b = builder_for(kind, tok)
    text = b.collate([b.example(x["kind"], x["prompt"], x["target"]) for x in batch])
    image = torch.randn(3, 5, 8)
    out = model(image, **text, names=labels)
    pooled = torch.nn.functional.normalize(model.soft_prompt(image).mean(1), dim=-1)
    logp = torch.log_softmax(pooled @ bank.vectors.t() / 0.1, -1)
    assert float(out.naming_sum) == pytest.approx(float(-(logp[0, 1] + logp[2, 2])), rel=1e-5)
    assert int(out.naming_count) == 2
    no_lm = Stage2Model(model.query_tokens, model.qformer, lm, placeholder_token_id(tok), use_lm=False).eval()
    no_lm.language_projection = model.language_projection
    no_lm.set_name_bank(bank.vectors, tau=0.1)
    monkeypatch.setattr(lm, "forward", None)  # would raise if called
    skipped = no_lm(image, **text, names=labels)
    monkeypatch.undo()
    assert int(skipped.lm_count) == 0 and torch.allclose(skipped.naming_sum, out.naming_sum)
    with pytest.raises(ValueError, match="two different names"):
        NameBank(["cat"], tok, embeddings)
