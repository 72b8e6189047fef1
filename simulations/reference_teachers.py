"""The scenario's teachers rebuilt on one machine, for evaluations that need the teacher ensemble.

The teachers of a federation stay at the institutions, so the run folder cannot hold them. For a
simulated run the researcher can retrain them as `client.teacher` does: the same private partitions
(Flower Datasets, same seed), architecture per partition, initial weights and per-round shuffling
seeds, one round of `local-epochs` per server round, with `torch-threads` threads; each round rebuilds
the model (which seeds torch, so dropout draws the same masks) and restores the weights, as a client does.
Without privacy and without FedMD digest rounds this replays what each institution did; otherwise the
differences are listed in `notes`. The retrained teachers' test accuracies are set beside those the
run recorded, which shows how faithful the replay is.

Their test-set logits are cached in `<run folder>/evaluation/teachers-test-logits.npz`, keyed by the settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.aggregation import AggregationParams, NEEDS_CLASS_COUNTS, aggregate
from common.config import RunConfig
from common.data import FederatedSplit
from common.errors import ConfigError
from common.models import build_model, input_shape, inputs_to_tensor
from common.partition import partition_rows
from common.training import train_supervised
from server.evaluation import EVAL_DIR, EnsembleLogits
from server.run_student import RunStudent, load_run_split, softmax, torch_logits

CACHE = "teachers-test-logits.npz"
SETTINGS = ("dataset", "data-dir", "public-size", "test-size", "max-seq-len", "seed", "num-clients", "partitioner",
            "dirichlet-alpha", "classes-per-client", "min-partition-size", "num-server-rounds", "teacher-models",
            "local-epochs", "teacher-lr", "teacher-batch-size", "torch-threads")


def replay_notes(cfg: RunConfig, recorded_rounds: list[dict[str, Any]]) -> list[str]:
    """Where the retrained teachers cannot be the run's teachers."""
    notes = []
    if cfg.privacy != "none":
        notes.append(f"the run trained its teachers under privacy {cfg.privacy!r}; these are trained without it")
    if cfg.digest_epochs or cfg.revisit_epochs:
        notes.append("the run's FedMD digest/revisit steps are not replayed (they depend on each round's consensus)")
    if cfg.sites_dir:
        notes.append("institutions with their own data folders (sites-dir) are replaced by the scenario's partitions")
    trained = (recorded_rounds[-1].get("teacher_rounds") or {}) if recorded_rounds else {}
    if trained and min(trained.values()) < cfg.num_server_rounds:
        notes.append("some institutions missed rounds in the run; every retrained teacher trains every round")
    return notes


def train_teachers(cfg: RunConfig, split: FederatedSplit,
                   on_teacher: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
    """Each partition's teacher trained as its institution trains it; returns its test logits and counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)  # the clients' thread count: same kernels, same rounding
    teachers = []
    try:
        for pid in range(cfg.num_clients):
            data, name = split.private.subset(partition_rows(split, cfg, pid)), cfg.teacher_model_for(pid)
            if on_teacher is not None:
                on_teacher(pid, name)
            inputs, weights = data.inputs, None
            for rounds_trained in range(cfg.num_server_rounds):
                # as client.teacher each round: build (which seeds torch, so dropout masks repeat), restore, train
                model = build_model(name, data.num_classes, input_shape(inputs), seed=cfg.seed + pid)
                if weights is not None:
                    model.load_state_dict(weights)
                train_supervised(model, inputs, data.labels, epochs=cfg.local_epochs, lr=cfg.teacher_lr,
                                 batch_size=cfg.teacher_batch_size,
                                 seed=cfg.seed * 1_000_003 + pid * 1_009 + rounds_trained)
                weights = model.state_dict()
            teachers.append({
                "model": name, "num_examples": len(data),
                "class_counts": np.bincount(data.labels, minlength=data.num_classes).astype(np.int64),
                "logits": torch_logits(model, inputs_to_tensor(split.test.inputs)),
            })
    finally:
        torch.set_num_threads(threads)
    return teachers


def reference_ensemble(student: RunStudent, *, refresh: bool = False,
                       on_teacher: Callable[[int, str], None] | None = None) -> EnsembleLogits:
    """The run's teacher ensemble on the test set, retrained (or read from the cache), aggregated by the run's rule."""
    cfg, recorded_rounds = student.cfg, student.results.get("rounds") or []
    if cfg.method != "distill":
        raise ConfigError(f"run {student.run_dir} is a {cfg.method!r} run: it has no teacher ensemble to compare with")
    cache = student.run_dir / EVAL_DIR / CACHE
    key = _settings_key(cfg)
    started = time.monotonic()
    split = load_run_split(student)
    teachers = None if refresh else _read_cache(cache, key)
    cached = teachers is not None
    if teachers is None:
        teachers = train_teachers(cfg, split, on_teacher)
        cache.parent.mkdir(exist_ok=True)
        _write_cache(cache, key, teachers)
    labels = np.asarray(split.test.labels)
    accuracies = [float((t["logits"].argmax(1) == labels).mean()) for t in teachers]
    recorded = sorted((recorded_rounds[-1].get("teacher_accuracy") or {}).values()) if recorded_rounds else []
    notes = replay_notes(cfg, recorded_rounds)
    details = {
        "teachers": [{"model": t["model"], "samples": int(t["num_examples"]), "accuracy": a} for t, a in zip(teachers, accuracies)],
        "teacher_accuracy_sorted": sorted(round(a, 4) for a in accuracies),
        "recorded_teacher_accuracy_sorted": recorded,
        "max_abs_diff_to_recorded": (float(np.max(np.abs(np.sort(accuracies) - np.asarray(recorded))))
                                     if len(recorded) == len(accuracies) else None),
        "exact_replay": not notes, "notes": notes, "cached": cached, "wall_s": round(time.monotonic() - started, 1),
    }
    rule = cfg.aggregation

    def probs_at(temperature: float) -> np.ndarray:
        answers = [softmax(t["logits"] / temperature) for t in teachers]
        counts = [t["class_counts"] for t in teachers] if rule in NEEDS_CLASS_COUNTS else None
        params = AggregationParams(cfg.era_temperature, cfg.trim_fraction, cfg.selective_threshold, temperature)
        return aggregate(rule, answers, [t["num_examples"] for t in teachers], counts, params).probs.astype(np.float64)

    source = (f"the scenario's {len(teachers)} teachers retrained locally on their partitions "
              f"({cfg.num_server_rounds} rounds x {cfg.local_epochs} epoch(s)), aggregated with the run's rule {rule!r}")
    return EnsembleLogits(probs_at, source, details)


def _settings_key(cfg: RunConfig) -> str:
    settings = {key: cfg.to_dict()[key] for key in SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        if str(saved["key"]) != key:
            return None
        models = json.loads(str(saved["models"]))
        return [{"model": m, "num_examples": int(n), "class_counts": c, "logits": z}
                for m, n, c, z in zip(models, saved["num_examples"], saved["class_counts"], saved["logits"])]


def _write_cache(path: Path, key: str, teachers: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, key=np.array(key), models=np.array(json.dumps([t["model"] for t in teachers])),
                        num_examples=np.array([t["num_examples"] for t in teachers], dtype=np.int64),
                        class_counts=np.stack([t["class_counts"] for t in teachers]),
                        logits=np.stack([t["logits"] for t in teachers]).astype(np.float32))
    tmp.replace(path)
