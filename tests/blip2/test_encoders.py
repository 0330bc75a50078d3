"""Image encoders behind one interface; a transformers vision tower (CLIP) plugs in with its second-to-last layer."""

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from blip2.encoders import HFVisionTower, build_encoder
from blip2.errors import CheckpointError
from conftest import image


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_tower_gives_second_to_last_layer(clip_folder):
    encoder = build_encoder({"type": "hf-vision", "source": str(clip_folder)})
    assert isinstance(encoder, HFVisionTower) and encoder.feature_dim == 32
    pixels = encoder.preprocess([image(0), image(1)])
    features = encoder(pixels)
    reference = CLIPVisionModel.from_pretrained(clip_folder)(pixel_values=pixels, output_hidden_states=True)
    assert features.shape == (2, 17, 32)  # 16 patches + CLS
    assert torch.equal(features, reference.hidden_states[-2])
    assert not torch.equal(features, reference.hidden_states[-1])


def test_efficientnet_tokens():
    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).freeze()
    features = encoder(encoder.preprocess([image(0)]))
    assert features.shape == (1, 49, 1280)


def test_frozen_tower_stays_in_eval_mode():
    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).freeze()
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_unknown_encoder():
    with pytest.raises(CheckpointError, match="Unknown image encoder"):
        build_encoder({"type": "resnet"})


def test_transformers_tower_without_source():
    with pytest.raises(CheckpointError, match="source"):
        build_encoder({"type": "hf-vision"})
