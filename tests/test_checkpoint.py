"""Loading sources, our checkpoint format, official export, and the errors for bad checkpoints."""

import json
import warnings

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from blip2.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointConfig, export_official, save_checkpoint
from conftest import image


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
