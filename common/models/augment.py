"""Label-preserving augmentation of public images while the student learns from them (run config `student-augment`).

The soft labels stay those the teachers gave the original image: a shift by a pixel or two, or a mirror image of a
garment, does not change its class. Each view is drawn afresh for every batch from the distillation's own seeded
generator, so a run repeats exactly.
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "shift", "shift-flip")  # run-config `student-augment`
SHIFT_PX = 2  # the largest shift, in pixels, each way


def augment_images(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A random view of each image of the batch `x` (n, channels, h, w): `shift` moves it by up to SHIFT_PX pixels
    each way (the border filled with zeros, the background of these images), `shift-flip` also mirrors half of
    them left to right; `none` returns `x`."""
    if kind == "none":
        return x
    if kind not in AUGMENTATIONS:
        raise ValueError(f"student-augment must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"student-augment {kind!r} applies to images (n, channels, h, w), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (SHIFT_PX, SHIFT_PX, SHIFT_PX, SHIFT_PX))
    top = torch.randint(0, 2 * SHIFT_PX + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * SHIFT_PX + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
    views = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if kind == "shift-flip":
        flip = torch.rand(n, generator=generator) < 0.5
        views = torch.where(flip[:, None, None, None], views.flip(-1), views)
    return views
