"""Stage-1 building blocks: BERT initialisation against transformers' BertModel, retrieval metrics against their
definition, configs and overrides."""

import pytest
import torch
from transformers import BertModel

from training.config import MINILM, ConfigError, Stage1Config, load_config
from training.retrieval import chance_recall, recall_at, rerank
from training.qformer_init import build_qformer, load_qformer_tokenizer
from blip2.llm import local_source


def test_bert_init_reproduces_bert_text_encoder():
    """Initialised from all-MiniLM-L6-v2, the Q-Former's text-only pass *is* that BERT (cross-attention unused)."""
    cfg = load_config(None, ["qformer.init=bert", "qformer.dropout=0.0"], Stage1Config)
    tokenizer = load_qformer_tokenizer(MINILM)
    model = build_qformer(cfg.qformer, tokenizer, 1280, cfg.train.seed, cfg.loss).eval()
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


def test_chance_recall_matches_random_rankings():
    correct = torch.zeros(3, 10, dtype=torch.bool)
    correct[0, 0] = True
    correct[1, :2] = True
    correct[2, :5] = True
    chance = chance_recall(correct, ks=(1, 5))
    # Exact: R@1 = mean(c / n); R@5 = mean(1 - C(n-c, 5) / C(n, 5)).
    from math import comb

    assert chance["R@1"] == pytest.approx(100 * (1 + 2 + 5) / 30)
    assert chance["R@5"] == pytest.approx(100 * sum(1 - comb(10 - c, 5) / comb(10, 5) for c in (1, 2, 5)) / 3)
    generator = torch.Generator().manual_seed(0)
    hits = [recall_at(torch.rand(3, 10, generator=generator), correct, ks=(5,))["R@5"] for _ in range(3000)]
    assert sum(hits) / len(hits) == pytest.approx(chance["R@5"], abs=1.5)


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
    cfg = load_config("training/configs/stage1_tiny.yaml", ["optim.lr=1e-3", "train.steps=3", "output_dir=x"], Stage1Config)
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 3 and cfg.output_dir == "x"
    assert cfg.qformer.hidden_size == 64  # from the file
    with pytest.raises(ConfigError, match="optim.lr_peak"):
        load_config(None, ["optim.lr_peak=1"], Stage1Config)
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(None, ["optim.lr=fast"], Stage1Config)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"], Stage1Config)
    bad = tmp_path / "bad.yaml"
    bad.write_text("qformer: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, [], Stage1Config)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", [], Stage1Config)


def test_mean_pooled_text_feature_is_the_sentence_transformers_embedding_at_init():
    """text_pooling=mean with all 6 layers: before training, the ITC text feature's input is exactly the
    all-MiniLM-L6-v2 sentence embedding (its mean pooling), the space the retrieval recipe starts from."""
    cfg = load_config(None, ["qformer.init=bert", "qformer.dropout=0.0", "qformer.text_pooling=mean"], Stage1Config)
    tokenizer = load_qformer_tokenizer(MINILM)
    model = build_qformer(cfg.qformer, tokenizer, 1280, cfg.train.seed, cfg.loss).eval()
    bert = BertModel.from_pretrained(local_source(MINILM)).eval()
    tokens = tokenizer(["a red circle on the left", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = []
        model.text_projection.register_forward_hook(lambda module, args, out: pooled.append(args[0]))
        model.itc_features(torch.zeros(2, 49, 1280), tokens["input_ids"], tokens["attention_mask"])
        hidden = bert(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        sentence = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(pooled[0], sentence, atol=1e-4)


def test_pretrained_lr_scale_applies_to_the_loaded_bert_weights_only():
    from training.engine import LoopConfig, param_groups

    cfg = load_config(None, ["qformer.init=bert"], Stage1Config)
    model = build_qformer(cfg.qformer, load_qformer_tokenizer(MINILM), 1280, cfg.train.seed, cfg.loss)
    pretrained = model.pretrained_names
    assert "qformer.encoder.layer.0.attention.attention.query.weight" in pretrained
    assert not any("crossattention" in n or n == "query_tokens" for n in pretrained)
    loop = LoopConfig(steps=1, batch_size=1, lr=1e-3, weight_decay=0.0)
    groups = param_groups(model, loop, lambda name: 0.1 if name in pretrained else 1.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["qformer.encoder.layer.0.attention.attention.query.weight"])] == pytest.approx(1e-4)
    assert lr_of[id(named["qformer.encoder.layer.0.crossattention.attention.query.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["query_tokens"])] == pytest.approx(1e-3)


def test_repeat_by_source_lists_items_that_many_times():
    from training.config import ConfigError
    from training.sampling import repeat_by_source

    class Items:
        items = [{"source": "a"}, {"source": "b"}, {"source": "a"}]

        def __getitem__(self, i):
            return self.items[i]

        def __len__(self):
            return 3

    repeated = repeat_by_source(Items(), {"a": 3})
    assert [repeated[i]["source"] for i in range(len(repeated))].count("a") == 6 and len(repeated) == 7
    with pytest.raises(ConfigError, match="'c'"):
        repeat_by_source(Items(), {"c": 2})
    with pytest.raises(ConfigError, match="whole number"):
        repeat_by_source(Items(), {"a": 0})


def test_unquoted_no_for_mixed_precision_means_no():
    """`train.mixed_precision=no` on the command line is YAML for false; it must mean "no", not crash accelerate."""
    from training.engine import make_accelerator

    cfg = load_config(None, ["train.mixed_precision=no"], Stage1Config)
    assert cfg.train.mixed_precision == "no"
    assert make_accelerator(cfg.train.mixed_precision).mixed_precision == "no"


def test_freeze_text_keeps_berts_text_weights_through_training():
    """qformer.freeze_text: word embeddings and text FFNs stay exactly BERT's (what an instruction-aware model
    then references, blip2.bert_text.bert_text_weights) while the rest of the Q-Former trains."""
    from blip2.bert_text import bert_text_weights
    from training.engine import LoopConfig, param_groups

    cfg = load_config(None, ["qformer.init=bert", "qformer.num_hidden_layers=2", "qformer.freeze_text=true",
                             "qformer.num_query_tokens=4"], Stage1Config)
    tokenizer = load_qformer_tokenizer(MINILM)
    model = build_qformer(cfg.qformer, tokenizer, 1280, cfg.train.seed, cfg.loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, LoopConfig(steps=1, batch_size=2, lr=1e-3, weight_decay=0.05)))
    tokens = tokenizer(["a red circle", "a blue square"], padding=True, return_tensors="pt")
    for _ in range(2):
        losses = model(torch.randn(2, 49, 1280), tokens["input_ids"], tokens["attention_mask"],
                       image_ids=torch.tensor([1, 2]))
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    reference = bert_text_weights(MINILM, 2)
    words = reference.pop("qformer_embeddings.word_embeddings.weight")
    assert torch.equal(after["embeddings.word_embeddings.weight"][: words.shape[0]], words)
    for name, tensor in reference.items():
        assert torch.equal(after[name], tensor), name
    assert not torch.equal(after["qformer.encoder.layer.0.attention.attention.query.weight"],
                           before["qformer.encoder.layer.0.attention.attention.query.weight"])
    assert not torch.equal(after["qformer.encoder.layer.0.intermediate_query.dense.weight"],
                           before["qformer.encoder.layer.0.intermediate_query.dense.weight"])
