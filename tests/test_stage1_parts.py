"""Stage-1 building blocks: BERT initialisation against transformers' BertModel, retrieval metrics against their
definition, configs and overrides."""

import pytest
import torch
from transformers import BertModel

from training.config import ConfigError, load_config
from training.retrieval import recall_at, rerank
from training.stage1 import DEFAULTS, MINILM, build_model, load_qformer_tokenizer
from blip2.llm import local_source


def test_bert_init_reproduces_bert_text_encoder():
    """Initialised from all-MiniLM-L6-v2, the Q-Former's text-only pass *is* that BERT (cross-attention unused)."""
    cfg = load_config(None, ["qformer.init=bert", "qformer.dropout=0.0"], DEFAULTS)
    tokenizer = load_qformer_tokenizer(MINILM)
    model = build_model(cfg, tokenizer, encoder_dim=1280).eval()
    bert = BertModel.from_pretrained(local_source(MINILM)).eval()
    tokens = tokenizer(["a red circle on the left", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.text_features(tokens["input_ids"], tokens["attention_mask"])
        reference = bert(**tokens).last_hidden_state
    real = tokens["attention_mask"].bool()
    assert torch.allclose(ours[real], reference[real], atol=1e-4)
    # The [DEC] token was added and the query branch got BERT's FFN as a copy.
    assert model.dec_token_id == len(tokenizer) - 1
    layer = model.qformer.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)


def test_recall_at_definition():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    correct = torch.eye(3, dtype=torch.bool)
    # ranks of the correct item: row0 -> 1st, row1 -> 2nd, row2 -> 3rd
    assert recall_at(scores, correct, ks=(1, 2, 3)) == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def test_rerank_only_reorders_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0]])
    reranked = rerank(scores, 2, lambda row, cols: torch.tensor([-1.0, 1.0]))  # ITM prefers column 1
    assert reranked[0].argsort(descending=True)[:2].tolist() == [1, 0]
    assert reranked[0, 2] < reranked[0, 0] and reranked[0, 3] < reranked[0, 0]


def test_overrides_and_errors(tmp_path):
    cfg = load_config("training/configs/stage1_tiny.yaml", ["optim.lr=1e-3", "train.steps=3", "output_dir=x"], DEFAULTS)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["steps"] == 3 and cfg["output_dir"] == "x"
    assert cfg["qformer"]["hidden_size"] == 64  # from the file
    with pytest.raises(ConfigError, match="optim.lr_peak"):
        load_config(None, ["optim.lr_peak=1"], DEFAULTS)
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(None, ["optim.lr=fast"], DEFAULTS)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"], DEFAULTS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("qformer: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, [], DEFAULTS)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", [], DEFAULTS)
