"""Fixed image features for teachers trained under DP-SGD: the scattering transform, and a linear head on it.

Tramer & Boneh (2021), "Differentially Private Learning Needs Better Features (or Much More Data)", ICLR:
under DP-SGD, a linear model on ScatterNet features (Oyallon & Mallat, 2015; Bruna & Mallat, 2013) beats
end-to-end CNNs at moderate budgets, because the features cost no privacy (they are fixed wavelets, not
learnt from data) and the few trainable weights leave the gradient noise less to spoil. Their set-up, kept
here: scattering of order 2 with J = 2 scales and L = 8 orientations (1 + J·L + L²·J(J−1)/2 = 81 channels
at 1/4 of the image's height and width), group normalisation of the channels (per sample, so it needs no
statistics of anybody's data, 27 groups of 3), and one linear layer.

The transform is kymatio's (Andreux et al., 2020). Its filters are fixed, so `ScatterLinear.features` has
no trainable weights and `fixed_stage` lets training and inference run it once per data set (cached by
content) and train only the head: the same model, an order of magnitude less work per epoch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import cast

import torch
from torch import nn

from common.errors import ConfigError

SCALES, ORIENTATIONS = 2, 8
CHANNELS = 1 + SCALES * ORIENTATIONS + ORIENTATIONS**2 * SCALES * (SCALES - 1) // 2  # 81
GROUPS = 27
CACHE_ENTRIES = 12  # the private sets of the nodes one simulation process serves, the public and test sets
_BATCH = 1024


class Scattering(nn.Module):
    """(n, 1, h, w) images in [0, 1] -> (n, 81, h/4, w/4) scattering coefficients; no trainable weights."""

    def __init__(self, image_size: tuple[int, ...]):
        super().__init__()
        # kymatio's torch front end, imported from its 2-D module: `kymatio.torch` also loads the 3-D
        # transform, whose import fails with SciPy >= 1.15 (scipy.special.sph_harm was removed).
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        height, width = image_size
        if height % 4 or width % 4:
            raise ConfigError(f"scatter-linear needs image sides divisible by 4, got {height}x{width}; choose cnn-* or mlp")
        self.transform = ScatteringTorch2D(J=SCALES, shape=(height, width), L=ORIENTATIONS)
        self.out_shape = (CHANNELS, height // 4, width // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coefficients: torch.Tensor = self.transform(x[:, 0].contiguous()).reshape(len(x), *self.out_shape)
        return coefficients


class ScatterLinear(nn.Module):
    """Scattering features (fixed), group normalisation without affine weights, one linear layer."""

    fixed_features = True  # `features` has no trainable weights: see `fixed_stage`

    def __init__(self, num_classes: int, image_size: tuple[int, ...]):
        super().__init__()
        self.features = Scattering(image_size)
        channels, height, width = self.features.out_shape
        self.head = nn.Sequential(nn.GroupNorm(GROUPS, channels, affine=False), nn.Flatten(),
                                  nn.Linear(channels * height * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


_cache: OrderedDict[tuple[str, tuple[int, ...], str], torch.Tensor] = OrderedDict()


def fixed_stage(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(the part of `model` to train or run, its inputs): for a model with `fixed_features`, the head and
    the features of all of `x` computed once (and cached by content, so a node's rounds reuse them);
    for every other model, the model itself and `x`."""
    if not getattr(model, "fixed_features", False):
        return model, x
    features, head = cast(Scattering, model.features), cast(nn.Module, model.head)
    key = (type(features).__name__, tuple(x.shape), hashlib.sha1(x.detach().contiguous().numpy().tobytes()).hexdigest())
    if key not in _cache:
        with torch.no_grad():
            _cache[key] = torch.cat([features(x[i:i + _BATCH]) for i in range(0, len(x), _BATCH)]) if len(x) else \
                torch.empty(0, *features.out_shape)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return head, _cache[key]
