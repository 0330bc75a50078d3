"""Fine-tuning the image encoder with the Q-Former (captioning, paper Table 7): which weights train, and
layer-wise learning-rate decay (BEiT), so the layers nearest the pixels move least."""

from __future__ import annotations

import re


def make_trainable(encoder):
    """Trainable weights, but BatchNorm statistics and dropout stay as pretrained (eval mode): small batches would
    only add noise to them. The ImageNet classifier is never used, so it stays frozen."""
    encoder.requires_grad_(True)
    for name, param in encoder.named_parameters():
        param.requires_grad_(not name.startswith("net._fc."))
    return encoder


def layer_decay_scale(name: str, num_layers: int, decay: float) -> float:
    """Layer-wise learning-rate decay for an image encoder parameter (paper Table 7 / BEiT): the stem gets
    ``decay ** (L + 1)``, block i (0-based) ``decay ** (L - i)``, the head 1."""
    match = re.search(r"\.(?:layers|layer|_blocks)\.(\d+)\.", name)
    if match:
        depth = int(match.group(1)) + 1
    elif re.search(r"embed|_conv_stem|_bn0\.", name):
        depth = 0
    else:
        depth = num_layers + 1
    return decay ** (num_layers + 1 - depth)


def encoder_depth(encoder) -> int:
    indices = [int(m.group(1)) for n, _ in encoder.named_parameters()
               if (m := re.search(r"(?:^|\.)(?:layers|layer|_blocks)\.(\d+)\.", n))]
    return max(indices) + 1 if indices else 0


def lr_scale_for(encoder, layer_decay: float):
    """``name -> learning-rate multiplier`` for a Stage2Model whose ``vision`` is ``encoder``."""
    depth = encoder_depth(encoder)
    return lambda name: layer_decay_scale(name, depth, layer_decay) if name.startswith("vision.") else 1.0
