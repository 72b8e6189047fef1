"""A set's model inputs as tensors: uint8 images scaled to [0, 1], features and token ids as they are."""

from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `(n, h, w)` images to float `(n, 1, h, w)` in [0, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)


def inputs_to_tensor(inputs: np.ndarray) -> torch.Tensor:
    """A set's `inputs` as its models consume them, by dtype: uint8 images scaled (`images_to_tensor`),
    float32 features and int64 token ids as they are."""
    if inputs.dtype == np.uint8:
        return images_to_tensor(inputs)
    if inputs.dtype in (np.float32, np.int64):
        return torch.from_numpy(np.ascontiguousarray(inputs))
    raise TypeError(f"model inputs must be uint8 images, float32 features or int64 token ids, got {inputs.dtype}")


def input_shape(inputs: np.ndarray) -> tuple[int, ...]:
    """One sample's shape: what `common.models.registry.build_model` needs to size a model for these inputs."""
    return tuple(int(d) for d in inputs.shape[1:])
