"""Baselines that need no federation, on the same split, partitions and seeds as a scenario:
local-only (each institution trains alone) and centralised (one model on the pooled private data)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.data import load_split
from common.models import build_model, count_parameters
from common.partition import partition_indices
from common.training import accuracy, train_supervised


def local_only(cfg: RunConfig, epochs: int | None = None) -> dict[str, Any]:
    """Each institution's own architecture trained on its partition alone for `epochs`
    (default: as many epochs as its teacher gets in the federation), evaluated on the test set."""
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    epochs = epochs if epochs is not None else cfg.local_epochs * cfg.num_server_rounds
    started = time.monotonic()
    per_client = {}
    for pid in range(cfg.num_clients):
        rows = partition_indices(
            split.private.labels, cfg.num_clients, pid, cfg.partitioner, alpha=cfg.dirichlet_alpha,
            classes_per_client=cfg.classes_per_client, min_partition_size=cfg.min_partition_size, seed=cfg.seed,
        )
        data = split.private.subset(rows)
        name = cfg.teacher_model_for(pid)
        model = build_model(name, data.num_classes, tuple(data.images.shape[1:]), seed=cfg.seed + pid)
        train_supervised(model, data.images, data.labels, epochs=epochs, lr=cfg.teacher_lr,
                         batch_size=cfg.teacher_batch_size, seed=cfg.seed * 1_000_003 + pid * 1_009)
        per_client[str(pid)] = {"model": name, "samples": len(data), "accuracy": accuracy(model, split.test.images, split.test.labels)}
    accs = [c["accuracy"] for c in per_client.values()]
    return {
        "epochs": epochs, "per_client": per_client, "accuracy_mean": float(np.mean(accs)),
        "accuracy_min": float(np.min(accs)), "accuracy_max": float(np.max(accs)),
        "wall_s": round(time.monotonic() - started, 1),
    }


def centralised(cfg: RunConfig, epochs: int | None = None) -> dict[str, Any]:
    """The student architecture and the largest teacher architecture, each trained on the pooled
    private data (what no federation can beat without more data)."""
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    epochs = epochs if epochs is not None else cfg.local_epochs * cfg.num_server_rounds
    pooled, test = split.private, split.test
    size = tuple(pooled.images.shape[1:])
    largest = max(cfg.teacher_model_list, key=lambda n: count_parameters(build_model(n, pooled.num_classes, size)))
    result: dict[str, Any] = {"epochs": epochs, "samples": len(pooled)}
    for role, name in (("student", cfg.student_model), ("teacher", largest)):
        started = time.monotonic()
        model = build_model(name, pooled.num_classes, size, seed=cfg.seed)
        train_supervised(model, pooled.images, pooled.labels, epochs=epochs, lr=cfg.teacher_lr,
                         batch_size=cfg.teacher_batch_size, seed=cfg.seed)
        result[role] = {"model": name, "params": count_parameters(model),
                        "accuracy": accuracy(model, test.images, test.labels),
                        "wall_s": round(time.monotonic() - started, 1)}
    return result


def use_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
