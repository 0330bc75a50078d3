"""Stage-1 masks and losses, against explicit formulas on tiny tensors, and 2-process == 1-process."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import Blip2QFormerConfig

from training.qformer import (Stage1QFormer, bidirectional_mask, hard_negatives, multimodal_causal_mask,
                              not_negatives)

VOCAB, CLS, DEC, PAD = 50, 1, 2, 0


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                encoder_hidden_size=24, vocab_size=VOCAB, max_position_embeddings=32,
                                cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Stage1QFormer(config, num_query_tokens=3, embed_dim=16, cls_token_id=CLS, dec_token_id=DEC,
                         pad_token_id=PAD, **kw).eval()


def batch(b=4, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_embeds = torch.randn(b, 5, 24, generator=g)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -2:] = 0  # padding
    ids[0, -2:] = PAD
    return image_embeds, ids, mask


# -- masks ---------------------------------------------------------------------------------------------------
def test_mask_shapes_by_formula():
    text = torch.tensor([[1, 1, 0]])
    causal = multimodal_causal_mask(2, text)[0].int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0],  # queries: queries only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # text 0: queries + itself
        [1, 1, 1, 1, 0],  # text 1: queries + text 0..1
        [1, 1, 1, 1, 0],  # text 2 (padding) never seen by anyone
    ])
    assert torch.equal(causal, expected)
    bidirectional = bidirectional_mask(2, text)[0].int()
    assert torch.equal(bidirectional, torch.tensor([[1, 1, 1, 1, 0]] * 5))


def test_itc_query_outputs_do_not_depend_on_text():
    model = tiny_model()
    image_embeds, ids, mask = batch()
    feats_a, _ = model.itc_features(image_embeds, ids, mask)
    other = torch.randint(3, VOCAB, ids.shape)
    feats_b, text_b = model.itc_features(image_embeds, other, mask)
    assert torch.equal(feats_a, feats_b)
    # ... and the text [CLS] feature does not depend on the image.
    _, text_c = model.itc_features(torch.randn_like(image_embeds), other, mask)
    assert torch.equal(text_b, text_c)


def test_mean_text_pooling_is_the_masked_mean_of_the_text_outputs():
    model = tiny_model(text_pooling="mean")
    image_embeds, ids, mask = batch()
    _, text = model.itc_features(image_embeds, ids, mask)
    hidden = model.text_features(ids, mask)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        expected = F.normalize(model.text_projection(hidden[row, :n].mean(0)), dim=-1)
        assert torch.allclose(text[row], expected, atol=1e-6)
    # padding tokens do not count: other ids under the padding give the same feature
    other = ids.clone()
    other[0, -2:] = 7
    assert torch.allclose(model.itc_features(image_embeds, other, mask)[1][0], text[0], atol=1e-6)
    # the [CLS] pooling of the paper is a different feature
    assert not torch.allclose(tiny_model(text_pooling="cls").itc_features(image_embeds, ids, mask)[1], text)
    with pytest.raises(ValueError, match="text_pooling"):
        tiny_model(text_pooling="max")


def test_itg_later_token_cannot_change_earlier_logits():
    model = tiny_model()
    image_embeds, ids, mask = batch()
    logits = model.itg_logits(image_embeds, ids, mask)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 7) % VOCAB
    logits2 = model.itg_logits(image_embeds, changed, mask)
    assert torch.equal(logits[:, :4], logits2[:, :4])  # positions before 4: bit-identical
    assert not torch.allclose(logits[1:, 4:], logits2[1:, 4:])  # positions from 4 on see the change
    # ITG's query outputs equal the query-only pass (queries never see text).
    hidden = model.joint(image_embeds, ids, mask, causal=True)[:, :3]
    assert torch.allclose(hidden, model.image_queries(image_embeds), atol=1e-6)


def test_itg_text_sees_the_image():
    model = tiny_model()
    image_embeds, ids, mask = batch()
    assert not torch.allclose(model.itg_logits(image_embeds, ids, mask), model.itg_logits(image_embeds * 2, ids, mask))


def test_itm_queries_see_text_but_not_padding():
    model = tiny_model()
    image_embeds, ids, mask = batch()
    logits = model.itm_logits(image_embeds, ids, mask)
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 5) % VOCAB
    assert not torch.allclose(logits, model.itm_logits(image_embeds, changed, mask))  # bidirectional
    pad_changed = ids.clone()
    pad_changed[0, -2:] = 9  # hidden by the padding mask
    assert torch.allclose(logits, model.itm_logits(image_embeds, pad_changed, mask), atol=1e-6)


# -- losses against explicit formulas --------------------------------------------------------------------------
def explicit_ce(logits_row: list[float], target: int, eps: float = 0.0) -> float:
    m = max(logits_row)
    log_z = m + math.log(sum(math.exp(v - m) for v in logits_row))
    log_p = [v - log_z for v in logits_row]
    return -(1 - eps) * log_p[target] - eps / len(log_p) * sum(log_p)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_itc_matches_explicit_formula(smoothing):
    model = tiny_model(itc_label_smoothing=smoothing)
    image_embeds, ids, mask = batch()
    with torch.no_grad():
        losses = model(image_embeds, ids, mask)
        z, t = model.itc_features(image_embeds, ids, mask)
    b, temp = z.shape[0], float(model.temp.detach())
    total = 0.0
    for i in range(b):  # similarity = max over queries of the cosine similarity, / temperature
        i2t = [max(float(z[i, q] @ t[j]) for q in range(z.shape[1])) / temp for j in range(b)]
        t2i = [max(float(t[i] @ z[j, q]) for q in range(z.shape[1])) / temp for j in range(b)]
        total += explicit_ce(i2t, i, smoothing) + explicit_ce(t2i, i, smoothing)
    assert float(losses.itc) == pytest.approx(total / (2 * b), rel=1e-5)


def test_itg_matches_explicit_formula():
    model = tiny_model()
    image_embeds, ids, mask = batch()
    with torch.no_grad():
        losses = model(image_embeds, ids, mask)
        logits = model.itg_logits(image_embeds, ids, mask)
    terms = [
        explicit_ce(logits[i, p].tolist(), int(ids[i, p + 1]))
        for i in range(ids.shape[0]) for p in range(ids.shape[1] - 1) if mask[i, p + 1]
    ]
    assert float(losses.itg) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_itm_matches_explicit_formula():
    model = tiny_model()
    image_embeds, ids, mask = batch()
    with torch.no_grad():
        losses = model(image_embeds, ids, mask, step=3)
        z, t = model.itc_features(image_embeds, ids, mask)
        sim = torch.einsum("iqe,je->ijq", z, t).amax(-1) / model.temp
        neg_text, neg_image = hard_negatives(sim, not_negatives(torch.arange(4), ids), step=3)
        b = ids.shape[0]
        terms = []
        for i in range(b):
            pos = model.itm_logits(image_embeds[i:i + 1], ids[i:i + 1], mask[i:i + 1])[0].tolist()
            nt = int(neg_text[i])
            neg1 = model.itm_logits(image_embeds[i:i + 1], ids[nt:nt + 1], mask[nt:nt + 1])[0].tolist()
            ni = int(neg_image[i])
            neg2 = model.itm_logits(image_embeds[ni:ni + 1], ids[i:i + 1], mask[i:i + 1])[0].tolist()
            terms += [explicit_ce(pos, 1), explicit_ce(neg1, 0), explicit_ce(neg2, 0)]
    assert float(losses.itm) == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert float(losses.loss) == pytest.approx(float(losses.itc + losses.itm + losses.itg), rel=1e-6)
    with torch.no_grad():
        weighted = tiny_model(itm_weight=10.0)(image_embeds, ids, mask, step=3)
    assert float(weighted.itm) == pytest.approx(float(losses.itm), rel=1e-6)  # same model, same negatives
    assert float(weighted.loss) == pytest.approx(float(losses.itc + 10 * losses.itm + losses.itg), rel=1e-5)


def test_hard_negatives_exclude_positives_and_follow_similarity():
    sim = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0]])
    same = torch.eye(4, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True  # rows 0 and 3 show the same image
    counts = torch.zeros(4, 4)
    for step in range(200):
        neg_text, _ = hard_negatives(sim, same, step)
        counts[torch.arange(4), neg_text] += 1
        assert not same[torch.arange(4), neg_text].any()
    assert counts[0, 1] > 190 and counts[3, 2] > 190  # the hardest negative dominates
    assert counts[1].gt(20).sum() == 3  # uniform similarity: every negative gets drawn


def test_a_caption_identical_to_the_positive_is_never_a_negative():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 8, 0], [9, 9, 9, 9]])  # rows 0 and 1: the same text
    image_ids = torch.tensor([0, 1, 2, 2])  # rows 2 and 3: the same image
    blocked = not_negatives(image_ids, ids)
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = expected[2, 3] = expected[3, 2] = True
    assert torch.equal(blocked, expected)
    sim = torch.full((4, 4), 0.0)
    sim[0, 1] = 50.0  # the most similar "negative" of image 0 is its own caption under another image
    for step in range(50):
        neg_text, _ = hard_negatives(sim, blocked, step)
        assert neg_text[0] in (2, 3) and neg_text[1] in (2, 3)


def test_itm_negatives_ramp_from_uniform_to_hard(monkeypatch):
    """With itm_negatives_ramp=R the negatives are drawn from the ITC similarities scaled by step / R: uniform at
    step 0 (all zero), half at R / 2, the paper's hard negatives from R on."""
    import training.qformer as qformer

    drawn = []

    def spy(sim, blocked, step):
        drawn.append(sim.clone())
        return hard_negatives(sim, blocked, step)

    monkeypatch.setattr(qformer, "hard_negatives", spy)
    image_embeds, ids, mask = batch()
    model = tiny_model(itm_negatives_ramp=10)
    with torch.no_grad():
        z, t = model.itc_features(image_embeds, ids, mask)
        full = torch.einsum("iqe,je->ijq", z, t).amax(-1) / model.temp
        for step in (0, 5, 10, 25):
            model(image_embeds, ids, mask, step=step)
        tiny_model()(image_embeds, ids, mask, step=0)  # no ramp: hard from the start
    assert torch.equal(drawn[0], torch.zeros_like(full))
    for got, scale in zip(drawn[1:], (0.5, 1.0, 1.0, 1.0)):
        assert torch.allclose(got, full * scale, atol=1e-5)


def test_one_image_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="two different images"):
        hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), 0)


# -- distributed: 2 processes == 1 process at the same global batch ---------------------------------------------
def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model()
    image_embeds, ids, mask = batch(b=8)
    rows = slice(rank * 4, (rank + 1) * 4)
    losses = model(image_embeds[rows], ids[rows], mask[rows], step=5)
    losses.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(grads)  # what DDP does (then divides by world)
    values = torch.stack([losses.itc, losses.itm, losses.itg]).detach()
    dist.all_reduce(values)
    if rank == 0:
        out.put((values / world, grads / world))
    dist.destroy_process_group()


def test_two_processes_equal_one_process():
    model = tiny_model()
    image_embeds, ids, mask = batch(b=8)
    losses = model(image_embeds, ids, mask, step=5)
    losses.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    values, dist_grads = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    expected = torch.stack([losses.itc, losses.itm, losses.itg]).detach()
    assert torch.allclose(values, expected, rtol=1e-5, atol=1e-6), (values, expected)
    assert torch.allclose(dist_grads, grads, rtol=1e-4, atol=1e-6)
