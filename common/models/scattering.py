"""Fixed image features for teachers trained under DP-SGD: the scattering transform, and a linear head on it.

Tramer & Boneh (2021), "Differentially Private Learning Needs Better Features (or Much More Data)", ICLR:
under DP-SGD, a linear model on ScatterNet features (Oyallon & Mallat, 2015; Bruna & Mallat, 2013) beats
end-to-end CNNs at moderate budgets, because the features cost no privacy (they are fixed wavelets, not
learnt from data) and the few trainable weights leave the gradient noise less to spoil. Their set-up, kept
here: scattering of order 2 with J = 2 scales and L = 8 orientations (1 + J·L + L²·J(J−1)/2 = 81 channels
at 1/4 of the image's height and width), group normalisation of the channels (per sample, so it needs no
statistics of anybody's data, 27 groups of 3), and one linear layer.

`ScatterPCA` (`scatter-pca`) puts, between the normalised features and the linear layer, their projection on
the public transfer set's 128 leading principal components, each scaled to unit variance: Tramer & Boneh's
point taken one step on. The projection is fitted on the public set every party holds (no labels, no private
data: it costs no privacy and releases nothing), so it is as fixed as the wavelets, and DP-SGD trains 1,290
weights instead of 39,700: the same noise multiplier spoils ~30 times fewer coordinates, while the leading
components keep most of what the linear layer used (docs/privacy.md has the measured figures).

The transform is kymatio's (Andreux et al., 2020). Its filters are fixed, so `ScatterLinear.features` has
no trainable weights and `fixed_stage` lets training and inference run it once per data set (cached by
content) and train only the head: the same model, an order of magnitude less work per epoch.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any, cast

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


COMPONENTS = 128  # scatter-pca: principal components of the public set's features kept


class PublicProjection(nn.Module):
    """Centre on the public set's mean, project on its `components` leading principal directions, each scaled to
    unit variance (whitened). Buffers only, set by `fit` from the public set and saved with the model; no
    trainable weights. Used before `fit` it raises: a zero projection would train a constant classifier."""

    def __init__(self, dim: int, components: int):
        super().__init__()
        self.mean: torch.Tensor
        self.basis: torch.Tensor
        self.fitted: torch.Tensor
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(dim, components))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, z: torch.Tensor) -> None:
        """Fit on `z` (n, dim), the public set's normalised features; needs n > components. The directions are
        the covariance's leading eigenvectors, each signed so its largest entry is positive: the same public set
        gives every party the same projection. In float32 (the mean in float64): on Fashion-MNIST's 10,000 x 3,969
        features about a third of the time of float64, and the projected public set is white to 1e-4."""
        components = self.basis.shape[1]
        if len(z) <= components:
            raise ConfigError(f"scatter-pca fits {components} principal components on the public set, which has only "
                              f"{len(z)} samples; raise public-size above {components} or choose scatter-linear")
        mean = z.double().mean(0).float()
        centred = z - mean
        values, vectors = torch.linalg.eigh(centred.T @ centred / len(z))  # ascending
        values, vectors = values.flip(0)[:components], vectors.flip(1)[:, :components]
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        self.mean.copy_(mean)
        self.basis.copy_(vectors * signs / values.clamp_min(1e-12).sqrt())
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export() and not bool(self.fitted):
            raise RuntimeError("scatter-pca: its projection is fitted on the public set first (build_model(..., public=the "
                               "public inputs)), or restored with the teacher's saved weights")
        projected: torch.Tensor = (x - self.mean) @ self.basis
        return projected


class ScatterPCA(nn.Module):
    """Scattering features (fixed), group normalisation, the public set's whitened principal components (fixed,
    fitted by `fit_public`), then one linear layer, or with `hidden` > 0 a hidden layer of that width and ReLU
    before it."""

    fixed_features = True

    def __init__(self, num_classes: int, image_size: tuple[int, ...], components: int = COMPONENTS, hidden: int = 0):
        super().__init__()
        self.features = Scattering(image_size)
        channels, height, width = self.features.out_shape
        trained: list[nn.Module] = ([nn.Linear(components, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)] if hidden
                                    else [nn.Linear(components, num_classes)])
        self.head = nn.Sequential(nn.GroupNorm(GROUPS, channels, affine=False), nn.Flatten(),
                                  PublicProjection(channels * height * width, components), *trained)

    @property
    def projection(self) -> PublicProjection:
        return cast(PublicProjection, self.head[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits

    def fit_public(self, public: torch.Tensor) -> None:
        """Fit the projection on the public set's images `(n, 1, h, w)`, once per public set in a process (the nodes
        it serves, and each round's fresh build): `fixed_stage` finds the set's features by content, and the same
        features tensor finds the fit made from it."""
        _, features = fixed_stage(self, public)
        source, kept = _fitted.get("features"), _fitted.get("state")
        if source is None or source() is not features or kept is None or kept["basis"].shape != self.projection.basis.shape:
            with torch.no_grad():
                self.projection.fit(self.head[1](self.head[0](features)))
            kept = {name: value.clone() for name, value in self.projection.state_dict().items()}
            _fitted.update(features=weakref.ref(features), state=kept)  # one public set at a time; holds no features
        self.projection.load_state_dict(kept)


_fitted: dict[str, Any] = {}  # "features": a weak reference to the features the fit came from; "state": its buffers
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
