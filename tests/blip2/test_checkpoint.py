"""Loading sources, our checkpoint format, official export, and the errors for bad checkpoints."""

import json
import warnings

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from blip2.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointConfig, save_checkpoint
from blip2.export import export_official
from conftest import build_tiny_bert, image


def load(source, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blip2.load(str(source), precision="fp32", device="cpu", **kw)


def test_our_format_round_trip(our_checkpoint, tmp_path):
    model = load(our_checkpoint)
    assert not model.info.untrained and model.info.llm_family == "chat"
    saved = save_checkpoint(model, tmp_path / "copy", CheckpointConfig.read(our_checkpoint))
    files = sorted(p.name for p in saved.iterdir())
    assert files == [CONFIG_NAME, WEIGHTS_NAME]  # frozen parts are referenced, not copied
    again = load(saved)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    kwargs = dict(max_new_tokens=6, min_new_tokens=6)
    assert model.ask(image(0), "what?", **kwargs) == again.ask(image(0), "what?", **kwargs)


def test_bf16_export_is_half_the_size(our_checkpoint, tmp_path):
    model = load(our_checkpoint)
    config = CheckpointConfig.read(our_checkpoint)
    full = save_checkpoint(model, tmp_path / "fp32", config) / WEIGHTS_NAME
    half = save_checkpoint(model, tmp_path / "bf16", config, dtype=torch.bfloat16) / WEIGHTS_NAME
    assert half.stat().st_size < 0.6 * full.stat().st_size
    reloaded = load(tmp_path / "bf16")
    assert reloaded.qformer.layernorm.weight.dtype == torch.float32  # upcast on load


def test_export_official_loads_in_plain_transformers(opt_checkpoint, tmp_path):
    model = load(opt_checkpoint)
    out = export_official(model, tmp_path / "exported")
    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    prompt = "Question: what is it? Answer:"
    inputs = processor(images=image(0), text=prompt, return_tensors="pt")
    expected = ref.generate(**inputs, max_new_tokens=8, min_new_tokens=8)[0, inputs["input_ids"].shape[1]:].tolist()
    with model.stream(image(0), prompt, max_new_tokens=8, min_new_tokens=8, no_repeat_ngram_size=0) as s:
        list(s)
    assert s.reply.token_ids == expected
    assert load(out).state_dict().keys() == model.state_dict().keys()


def test_export_official_refuses_non_eva(our_checkpoint, tmp_path):
    with pytest.raises(blip2.CheckpointError, match="EVA ViT"):
        export_official(load(our_checkpoint), tmp_path / "x")


@pytest.mark.parametrize(
    "source, message",
    [
        ("/no/such/folder", "not found"),
        ("./relative/missing", "not found"),
        ("not a hub id at all", "not found"),
    ],
)
def test_missing_sources(source, message):
    with pytest.raises(blip2.CheckpointError, match=message):
        blip2.load(source, precision="fp32", device="cpu")


def test_unknown_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(blip2.CheckpointError, match="neither a blip2 checkpoint"):
        blip2.load(str(tmp_path), precision="fp32", device="cpu")


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(blip2.CheckpointError, match="pass the checkpoint folder"):
        blip2.load(str(path), precision="fp32", device="cpu")


def test_hub_id_offline_says_so():
    with pytest.raises(blip2.CheckpointError, match="network"):
        blip2.load("Salesforce/blip2-nonexistent-test-model", precision="fp32", device="cpu")


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupt_config(our_checkpoint, tmp_path):
    folder = _copy(our_checkpoint, tmp_path / "c")
    (folder / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(blip2.CheckpointError, match="corrupt"):
        load(folder)


def test_config_missing_fields(our_checkpoint, tmp_path):
    folder = _copy(our_checkpoint, tmp_path / "c")
    (folder / CONFIG_NAME).write_text(json.dumps({"vision": {}}))
    with pytest.raises(blip2.CheckpointError, match="missing required field"):
        load(folder)


def test_truncated_weights(our_checkpoint, tmp_path):
    folder = _copy(our_checkpoint, tmp_path / "c")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(blip2.CheckpointError, match="corrupt or truncated"):
        load(folder)


def test_missing_weights(our_checkpoint, tmp_path):
    folder = _copy(our_checkpoint, tmp_path / "c")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(blip2.CheckpointError, match="no trained weights"):
        load(folder)


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update({k: (v(folder) if callable(v) else v) for k, v in changes.items()})
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_query_tokens=7), "do not match"),  # weights from a run with another config
        (dict(format_version=99), "Upgrade"),
        (dict(llm=lambda folder: str(folder / "gone")), "language model"),
        (dict(vision={"type": "resnet"}), "Unknown image encoder"),
        (dict(qformer={"hidden_size": "wide"}), "Invalid Q-Former config"),
    ],
    ids=["other-config", "newer-format", "missing-llm", "unknown-encoder", "bad-qformer"],
)
def test_broken_config(our_checkpoint, tmp_path, changes, message):
    folder = _copy(our_checkpoint, tmp_path / "c")
    _edit_config(folder, **changes)
    with pytest.raises(blip2.CheckpointError, match=message):
        load(folder)


def test_text_only_weights_are_exactly_those_the_queries_never_use():
    """What a checkpoint may reference instead of store (is_text_only_weight): perturbing any of those weights
    leaves a query-only Q-Former pass unchanged and changes the pass with text; every other weight of a layer
    changes the query-only pass."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    from blip2.bert_text import is_text_only_weight
    from blip2.qformer import run_qformer

    torch.manual_seed(0)
    config = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                encoder_hidden_size=8, cross_attention_frequency=1, use_qformer_text_input=True,
                                vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = torch.nn.Module()
    module.qformer, module.qformer_embeddings = Blip2QFormerModel(config).eval(), Blip2TextEmbeddings(config)
    queries, image_embeds = torch.randn(1, 3, 16), torch.randn(1, 5, 8)
    text = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    def passes():  # the query outputs without text; every output (queries and text) with text
        with torch.no_grad():
            hidden = module.qformer_embeddings(input_ids=text["input_ids"], query_embeds=queries)
            mask = torch.ones(hidden.shape[:2], dtype=torch.long)
            full = module.qformer(query_embeds=hidden, query_length=3, attention_mask=mask,
                                  encoder_hidden_states=image_embeds).last_hidden_state
            return run_qformer(module.qformer, queries, image_embeds), full

    plain, aware = passes()
    text_only = [n for n, _ in module.named_parameters() if is_text_only_weight(n)]
    assert any("word_embeddings" in n for n in text_only) and any(".intermediate.dense" in n for n in text_only)
    for name, param in module.named_parameters():
        if name.startswith("qformer_embeddings.position") or ".layer." not in name and not is_text_only_weight(name):
            continue  # position embeddings are text-only but trained (stored); the top LayerNorm is shared
        if name.endswith("key.bias"):
            continue  # adds the same score to every key of a query: softmax ignores it, for queries and text alike
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(torch.randn_like(param))
        new_plain, new_aware = passes()
        if is_text_only_weight(name):
            assert torch.equal(new_plain, plain), name
            assert not torch.allclose(new_aware, aware), name
        else:
            assert not torch.allclose(new_plain, plain), name
        with torch.no_grad():
            param.copy_(saved)


def test_referenced_text_weights_are_not_stored_and_load_back(tiny_llm, tmp_path):
    """An instruction-aware checkpoint whose word embeddings and text FFNs are a BERT checkpoint's references them
    (qformer_text_frozen_from): trained.safetensors lacks them, and loading restores the exact model."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from blip2.bert_text import bert_text_weights, is_text_only_weight
    from blip2.checkpoint import QFORMER_TOKENIZER_DIR
    from blip2.loading import _build_ours
    from blip2.precision import resolve

    bert = build_tiny_bert(tmp_path / "bert")
    config = CheckpointConfig(
        vision={"type": "efficientnet-lite", "variant": "lite0"}, llm=str(tiny_llm),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     encoder_hidden_size=1280, cross_attention_frequency=1, use_qformer_text_input=True,
                     vocab_size=30522),
        num_query_tokens=4, qformer_text_input=True, qformer_text_frozen_from=str(bert),
    )
    folder = tmp_path / "ck"
    AutoTokenizer.from_pretrained(bert).save_pretrained(folder / QFORMER_TOKENIZER_DIR)
    model = _build_ours(config, None, resolve("fp32", "cpu"), label="tiny", folder=folder)
    reference = bert_text_weights(str(bert), 2)
    model.load_state_dict(reference, strict=False)
    with torch.no_grad():
        model.language_projection.weight.normal_(0, 2.0)
        model.query_tokens.normal_(0, 1.0)
    save_checkpoint(model, folder, config)
    stored = load_file(folder / WEIGHTS_NAME)
    assert not [k for k in stored if is_text_only_weight(k)]
    assert "qformer_embeddings.position_embeddings.weight" in stored and "qformer.layernorm.weight" in stored
    again = load(folder)
    assert again.instruction_aware
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    kwargs = dict(max_new_tokens=5, min_new_tokens=5)
    assert model.ask(image(1), "what color?", **kwargs) == again.ask(image(1), "what color?", **kwargs)
    _edit_config(folder, qformer_text_frozen_from=str(tmp_path / "no-such-bert"))
    with pytest.raises(blip2.CheckpointError, match="no-such-bert"):
        load(folder)
