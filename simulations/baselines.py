"""Baselines that need no federation, on the same split, partitions and seeds as a scenario:
local-only (each institution trains alone) and centralised (one model on the pooled private data)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.models.inputs import input_shape
from common.models.registry import build_model, count_parameters
from common.models.training import evaluate, train_supervised
from common.tasks.partition import partition_rows
from common.tasks.registry import load_split

METRIC_NAMES = ("balanced_accuracy", "macro_f1", "auroc")  # beside accuracy: the imbalance-aware metrics


def local_only(cfg: RunConfig, epochs: int | None = None) -> dict[str, Any]:
    """Each institution's own architecture trained on its partition alone for `epochs`
    (default: as many epochs as its teacher gets in the federation, `local-min-steps` included), evaluated on
    the test set. `epochs` in the result is the most any institution trained; each one's is in `per_client`."""
    split = _split(cfg)
    started = time.monotonic()
    per_client: dict[str, dict[str, Any]] = {}
    for pid in range(cfg.num_clients):
        data = split.private.subset(partition_rows(split, cfg, pid))
        name = cfg.teacher_model_for(pid)
        own = epochs if epochs is not None else cfg.local_epochs_for(len(data)) * cfg.num_server_rounds
        model = build_model(name, data.num_classes, input_shape(data.inputs), seed=cfg.seed + pid, public=split.public.inputs)
        train_supervised(model, data.inputs, data.labels, epochs=own, lr=cfg.teacher_lr,
                         batch_size=cfg.teacher_batch_size, seed=cfg.seed * 1_000_003 + pid * 1_009)
        metrics = evaluate(model, split.test.inputs, split.test.labels)
        per_client[str(pid)] = {"model": name, "samples": len(data), "epochs": own, **metrics}
    accs = [c["accuracy"] for c in per_client.values()]
    return {
        "epochs": max(c["epochs"] for c in per_client.values()), "per_client": per_client, "accuracy_mean": float(np.mean(accs)),
        "accuracy_min": float(np.min(accs)), "accuracy_max": float(np.max(accs)),
        **{f"{name}_mean": float(np.nanmean([c[name] for c in per_client.values()])) for name in METRIC_NAMES},
        "wall_s": round(time.monotonic() - started, 1),
    }


def centralised(cfg: RunConfig, epochs: int | None = None) -> dict[str, Any]:
    """The student architecture and the largest teacher architecture, each trained on the pooled
    private data (what no federation can beat without more data)."""
    split = _split(cfg)
    epochs = epochs if epochs is not None else cfg.local_epochs * cfg.num_server_rounds
    pooled, test = split.private, split.test
    size = input_shape(pooled.inputs)
    largest = max(cfg.teacher_model_list, key=lambda n: count_parameters(build_model(n, pooled.num_classes, size)))
    result: dict[str, Any] = {"epochs": epochs, "samples": len(pooled)}
    for role, name in (("student", cfg.student_model), ("teacher", largest)):
        started = time.monotonic()
        model = build_model(name, pooled.num_classes, size, seed=cfg.seed, public=split.public.inputs)
        train_supervised(model, pooled.inputs, pooled.labels, epochs=epochs, lr=cfg.teacher_lr,
                         batch_size=cfg.teacher_batch_size, seed=cfg.seed)
        result[role] = {"model": name, "params": count_parameters(model),
                        **evaluate(model, test.inputs, test.labels),
                        "wall_s": round(time.monotonic() - started, 1)}
    return result


def _split(cfg: RunConfig):
    return load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)


def use_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
