"""The run's teacher ensemble on one machine, for evaluations that need it (`fedstill evaluate --with-teachers`).

In a deployment the teachers stay at the institutions. A simulated run's institutions keep their final
teachers in their state folders (`sites/institution-<id>/teacher-<digest>.safetensors`, see
`client.teacher`): when every one is there, fully trained, for this run's public set, those are used.
Otherwise the researcher can retrain them as `client.teacher` does: the same private partitions
(Flower Datasets, same seed), architecture per partition, initial weights and per-round shuffling
seeds, one round of `local-epochs` per server round, with `torch-threads` threads; each round rebuilds
the model (which seeds torch, so dropout draws the same masks) and restores the weights, as a client does.
Without privacy and without FedMD digest rounds this replays what each institution did; otherwise the
differences are listed in `notes`. The teachers' test accuracies are set beside those the run recorded,
which shows how faithful the replay is.

Retrained teachers' test-set logits are cached in `<run folder>/evaluation/teachers-test-logits.npz`,
keyed by the settings that shape them.
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
from safetensors.torch import load_file

from client.release import site_folder
from client.site import SITE_DATA
from client.teacher import saved_header
from common.aggregation import NEEDS_CLASS_COUNTS, AggregationParams, aggregate
from common.config import RunConfig
from common.errors import ConfigError
from common.files import PRIVATE, atomic_path, private_folder
from common.models.inputs import input_shape, inputs_to_tensor
from common.models.registry import build_model
from common.models.training import train_supervised
from common.tasks.partition import partition_rows
from common.tasks.samples import FederatedSplit, public_fingerprint
from simulations.student.evaluate import EVAL_DIR, EnsembleLogits
from simulations.student.load import RunStudent, load_run_split, softmax, torch_logits

CACHE = "teachers-test-logits.npz"
SETTINGS = ("dataset", "data-dir", "public-size", "test-size", "max-seq-len", "seed", "num-clients", "partitioner",
            "dirichlet-alpha", "classes-per-client", "min-partition-size", "num-server-rounds", "teacher-models",
            "local-epochs", "local-min-steps", "teacher-lr", "teacher-batch-size", "torch-threads")


def replay_notes(cfg: RunConfig, recorded_rounds: list[dict[str, Any]]) -> list[str]:
    """Where the retrained teachers cannot be the run's teachers."""
    notes = []
    if cfg.privacy != "none":
        notes.append(f"the run trained its teachers under privacy {cfg.privacy!r}; these are trained without it")
    if cfg.digest_epochs or cfg.revisit_epochs:
        notes.append("the run's FedMD digest/revisit steps are not replayed (they depend on each round's consensus)")
    if cfg.sites_dir and any((site_folder(cfg.sites_dir, pid) / SITE_DATA).is_dir() for pid in range(cfg.num_clients)):
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
                model = build_model(name, data.num_classes, input_shape(inputs), seed=cfg.seed + pid, public=split.public.inputs)
                if weights is not None:
                    model.load_state_dict(weights)
                train_supervised(model, inputs, data.labels, epochs=cfg.local_epochs_for(len(data)), lr=cfg.teacher_lr,
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


def sites_folder(cfg: RunConfig, run_dir: Path) -> Path:
    """Where the run's simulated institutions kept their state: the scenario's sites-dir, else `<run>/sites`."""
    return Path(cfg.sites_dir) if cfg.sites_dir and Path(cfg.sites_dir).is_dir() else run_dir / "sites"


def saved_teacher(cfg: RunConfig, sites: Path, pid: int, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """Institution `pid`'s saved teacher for this run (its architecture, partition, seed and public set), the one
    trained the most rounds, with its header; None when it kept none."""
    name, found = cfg.teacher_model_for(pid), None
    for path in sorted(site_folder(sites, pid).glob("teacher-*.safetensors")):
        header = saved_header(path) or {}
        settings = header.get("settings") or {}
        if (header.get("model") == name and settings.get("partition_id") == pid and settings.get("seed") == cfg.seed
                and settings.get("public_fingerprint") == fingerprint
                and (found is None or header.get("rounds_trained", 0) > found[1].get("rounds_trained", 0))):
            found = (path, header)
    return found


def stored_teachers(cfg: RunConfig, run_dir: Path, split: FederatedSplit) -> tuple[list[dict[str, Any]] | None, str]:
    """The run's own final teachers, from its simulated institutions' state folders (`sites/institution-<id>/`,
    where `client.teacher` keeps them), or None and the reason they cannot be used."""
    sites = sites_folder(cfg, run_dir)
    fingerprint, teachers = public_fingerprint(split.public), []
    for pid in range(cfg.num_clients):
        name, found = cfg.teacher_model_for(pid), saved_teacher(cfg, sites, pid, fingerprint)
        if found is None:
            return None, f"no saved {name} teacher of institution {pid} in {sites}"
        if found[1].get("rounds_trained") != cfg.num_server_rounds:
            return None, f"institution {pid}'s saved teacher trained {found[1].get('rounds_trained')} of {cfg.num_server_rounds} rounds"
        data = split.private.subset(partition_rows(split, cfg, pid))
        model = build_model(name, data.num_classes, input_shape(data.inputs))
        model.load_state_dict(load_file(str(found[0])))
        teachers.append({"model": name, "num_examples": len(data), "path": str(found[0]),
                         "class_counts": np.bincount(data.labels, minlength=data.num_classes).astype(np.int64),
                         "logits": torch_logits(model, inputs_to_tensor(split.test.inputs))})
    return teachers, f"the run's own {len(teachers)} final teachers, read from the institutions' state folders in {sites}"


def reference_ensemble(student: RunStudent, *, retrain: bool = False,
                       on_teacher: Callable[[int, str], None] | None = None) -> EnsembleLogits:
    """The run's teacher ensemble on the test set, aggregated by the run's rule: the run's own teachers where
    its institutions kept them (simulations do), else retrained here (cached); `retrain` forces retraining."""
    cfg, recorded_rounds = student.cfg, student.results.get("rounds") or []
    if cfg.method != "distill":
        raise ConfigError(f"run {student.run_dir} is a {cfg.method!r} run: it has no teacher ensemble to compare with")
    started = time.monotonic()
    split = load_run_split(student)
    teachers, source, notes, cached = None, "", [], False
    if not retrain:
        teachers, reason = stored_teachers(cfg, student.run_dir, split)
        source = reason if teachers is not None else ""
        notes = [] if teachers is not None else [f"retrained because the run's own teachers are not usable: {reason}"]
    if teachers is None:
        teachers, cached = _retrained(student, split, retrain, on_teacher)
        notes += replay_notes(cfg, recorded_rounds)
        source = (f"the scenario's {len(teachers)} teachers retrained locally on their partitions "
                  f"({cfg.num_server_rounds} rounds x {cfg.local_epochs} epoch(s))")
    labels = np.asarray(split.test.labels)
    accuracies = [float((t["logits"].argmax(1) == labels).mean()) for t in teachers]
    recorded = sorted((recorded_rounds[-1].get("teacher_accuracy") or {}).values()) if recorded_rounds else []
    details = {
        "teachers": [{"model": t["model"], "samples": int(t["num_examples"]), "accuracy": a}
                     for t, a in zip(teachers, accuracies, strict=True)],
        "teacher_accuracy_sorted": sorted(round(a, 4) for a in accuracies),
        "recorded_teacher_accuracy_sorted": recorded,
        "max_abs_diff_to_recorded": (float(np.max(np.abs(np.sort(accuracies) - np.asarray(recorded))))
                                     if len(recorded) == len(accuracies) else None),
        "stored": "path" in teachers[0], "notes": notes, "cached": cached, "wall_s": round(time.monotonic() - started, 1),
    }
    rule = cfg.aggregation

    def probs_at(temperature: float) -> np.ndarray:
        answers = [softmax(t["logits"] / temperature) for t in teachers]
        counts = [t["class_counts"] for t in teachers] if rule in NEEDS_CLASS_COUNTS else None
        params = AggregationParams(cfg.era_temperature, cfg.trim_fraction, cfg.selective_threshold, temperature,
                                   cfg.weight_clip)
        return aggregate(rule, answers, [t["num_examples"] for t in teachers], counts, params).probs.astype(np.float64)

    return EnsembleLogits(probs_at, f"{source}, aggregated with the run's rule {rule!r}", details)


def _retrained(student: RunStudent, split: FederatedSplit, retrain: bool,
               on_teacher: Callable[[int, str], None] | None) -> tuple[list[dict[str, Any]], bool]:
    """Retrained teachers' test logits, from the cache when it matches (and `retrain` is off); and whether cached."""
    cache, key = student.run_dir / EVAL_DIR / CACHE, _settings_key(student.cfg)
    teachers = None if retrain else _read_cache(cache, key)
    if teachers is not None:
        return teachers, True
    teachers = train_teachers(student.cfg, split, on_teacher)
    private_folder(cache.parent)
    _write_cache(cache, key, teachers)
    return teachers, False


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
                for m, n, c, z in zip(models, saved["num_examples"], saved["class_counts"], saved["logits"], strict=True)]


def _write_cache(path: Path, key: str, teachers: list[dict[str, Any]]) -> None:
    with atomic_path(path, mode=PRIVATE, suffix=".npz") as tmp:
        np.savez_compressed(tmp, key=np.array(key), models=np.array(json.dumps([t["model"] for t in teachers])),
                            num_examples=np.array([t["num_examples"] for t in teachers], dtype=np.int64),
                            class_counts=np.stack([t["class_counts"] for t in teachers]),
                            logits=np.stack([t["logits"] for t in teachers]).astype(np.float32))
