"""Typed, validated view of the run config (`[tool.flwr.app.config]` in pyproject.toml).

Defaults live only in pyproject.toml. `RunConfig.from_run_config` turns Flower's flat kebab-case
mapping into a frozen dataclass once, at the edge, and reports every unknown, missing or ill-typed
key at once.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from common.aggregation import NEEDS_INDIVIDUAL_ROWS, RULES
from common.codecs import CODECS
from common.errors import ConfigError
from common.models.augment import AUGMENTATIONS
from common.models.registry import MODELS, models_for, unknown_model
from common.secagg.protocol import majority_threshold
from common.tasks.registry import DATASETS as DATASET_SPECS
from common.tasks.registry import dataset_task, natural_datasets

DATASETS = tuple(DATASET_SPECS)  # the registered data sets (common.tasks.registry): images, tables, texts
NATURAL_DATASETS = natural_datasets()  # data sets whose rows name their institution (partitioner "natural")
METHODS = ("distill", "fedavg")
SCHEDULES = ("constant", "linear")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
PRIVACY = ("none", "dp-sgd", "pate")
PRECISIONS = ("fp32", "bf16")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; field `foo_bar` is run-config key `foo-bar`."""

    scenario: str
    dataset: str
    data_dir: str
    public_size: int
    test_size: int
    seed: int
    num_clients: int
    min_clients: int
    partitioner: str
    dirichlet_alpha: float
    classes_per_client: int
    min_partition_size: int
    num_server_rounds: int
    temperature: float
    teacher_models: str
    student_model: str
    local_epochs: int
    local_min_steps: int
    teacher_lr: float
    teacher_batch_size: int
    fedavg_local_epochs: int
    fedavg_lr: float
    fedavg_batch_size: int
    student_epochs: int
    student_lr: float
    student_batch_size: int
    student_precision: str
    student_augment: str
    ce_weight: float
    labelled_size: int
    codec: str
    aggregation: str
    round_timeout: float
    max_in_flight: int
    node_wait_timeout: float
    output_dir: str
    run_name: str
    resume: bool
    torch_threads: int
    max_seq_len: int
    evaluate_teachers: bool
    method: str
    temperature_schedule: str
    temperature_final: float
    public_fraction: float
    student_head_epochs: int
    digest_epochs: int
    revisit_epochs: int
    codec_top_k: int
    era_temperature: float
    trim_fraction: float
    selective_threshold: float
    weight_clip: float
    allow_list: str
    coordinator_key: str
    sites_dir: str
    secure_aggregation: bool
    secagg_threshold: int
    privacy: str
    dp_noise_multiplier: float
    dp_max_grad_norm: float
    pate_teachers: int
    pate_queries: int
    pate_sigma: float

    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's `context.run_config` (kebab-case keys), checking every key."""
        hints = get_type_hints(cls)
        by_key = {name.replace("_", "-"): name for name in hints}
        problems = [f"unknown key {k!r}" for k in raw if k not in by_key]
        problems += [f"missing key {k!r}" for k in by_key if k not in raw]
        values: dict[str, Any] = {}
        for key, name in by_key.items():
            if key not in raw:
                continue
            value, problem = _coerce(key, raw[key], hints[name])
            if problem:
                problems.append(problem)
            values[name] = value
        if problems:
            raise ConfigError(
                "bad run config: " + "; ".join(problems)
                + f" (valid keys are listed in [tool.flwr.app.config] of {PYPROJECT.name})"
            )
        return cls(**values)

    def __post_init__(self) -> None:
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.partitioner in PARTITIONERS,
             f"partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}"),
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.temperature_schedule in SCHEDULES,
             f"temperature-schedule must be one of {SCHEDULES}, got {self.temperature_schedule!r}"),
            (self.temperature_final > 0, f"temperature-final must be > 0, got {self.temperature_final}"),
            (0.0 < self.public_fraction <= 1.0, f"public-fraction must be in (0, 1], got {self.public_fraction}"),
            (self.student_head_epochs >= 0, f"student-head-epochs must be >= 0, got {self.student_head_epochs}"),
            (self.digest_epochs >= 0 and self.revisit_epochs >= 0,
             f"digest-epochs and revisit-epochs must be >= 0, got {self.digest_epochs}, {self.revisit_epochs}"),
            (self.codec_top_k >= 1, f"codec-top-k must be >= 1, got {self.codec_top_k}"),
            (self.era_temperature > 0, f"era-temperature must be > 0, got {self.era_temperature}"),
            (0.0 <= self.trim_fraction < 0.5, f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (0.0 < self.selective_threshold <= 1.0,
             f"selective-threshold must be in (0, 1], got {self.selective_threshold}"),
            (self.weight_clip == 0 or 1.0 <= self.weight_clip < float("inf"),
             f"weight-clip must be 0 (off) or a finite multiple >= 1 of the median declared size, got {self.weight_clip}"),
            (self.public_size > 0, f"public-size must be > 0, got {self.public_size}"),
            (self.test_size >= 0, f"test-size must be >= 0 (0 = whole test set), got {self.test_size}"),
            (self.num_clients >= 1, f"num-clients must be >= 1, got {self.num_clients}"),
            (1 <= self.min_clients <= self.num_clients,
             f"min-clients must be in [1, num-clients={self.num_clients}], got {self.min_clients}"),
            (self.dirichlet_alpha > 0, f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}"),
            (self.classes_per_client >= 1,
             f"classes-per-client must be >= 1, got {self.classes_per_client}"),
            (self.min_partition_size >= 0,
             f"min-partition-size must be >= 0, got {self.min_partition_size}"),
            (self.num_server_rounds >= 1,
             f"num-server-rounds must be >= 1, got {self.num_server_rounds}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.local_epochs >= 0, f"local-epochs must be >= 0, got {self.local_epochs}"),
            (self.local_min_steps >= 0, f"local-min-steps must be >= 0 (0 = off), got {self.local_min_steps}"),
            (self.student_epochs >= 1, f"student-epochs must be >= 1, got {self.student_epochs}"),
            (self.teacher_lr > 0 and self.student_lr > 0 and self.fedavg_lr > 0,
             "teacher-lr, student-lr and fedavg-lr must be > 0"),
            (self.teacher_batch_size >= 1 and self.student_batch_size >= 1 and self.fedavg_batch_size >= 1,
             "teacher-batch-size, student-batch-size and fedavg-batch-size must be >= 1"),
            (self.fedavg_local_epochs >= 0, f"fedavg-local-epochs must be >= 0, got {self.fedavg_local_epochs}"),
            (self.student_precision in PRECISIONS,
             f"student-precision must be one of {PRECISIONS}, got {self.student_precision!r}"),
            (self.student_augment in AUGMENTATIONS,
             f"student-augment must be one of {', '.join(AUGMENTATIONS)}, got {self.student_augment!r}"),
            (self.student_augment == "none" or self.dataset not in DATASETS or dataset_task(self.dataset) == "image",
             f"student-augment {self.student_augment!r} shifts and mirrors images, and dataset {self.dataset!r} is a "
             f"{dataset_task(self.dataset) if self.dataset in DATASETS else ''} task: use student-augment = \"none\""),
            (0.0 <= self.ce_weight <= 1.0, f"ce-weight must be in [0, 1], got {self.ce_weight}"),
            (0 <= self.labelled_size <= self.public_size,
             f"labelled-size must be in [0, public-size={self.public_size}], got {self.labelled_size}"),
            (self.ce_weight == 0 or self.labelled_size > 0,
             "ce-weight > 0 needs labelled-size > 0 (the labelled public samples to apply it to)"),
            (self.max_in_flight >= 0, f"max-in-flight must be >= 0 (0 = every node at once), got {self.max_in_flight}"),
            (self.round_timeout > 0 and self.node_wait_timeout > 0,
             "round-timeout and node-wait-timeout must be > 0 seconds"),
            (self.torch_threads >= 1, f"torch-threads must be >= 1, got {self.torch_threads}"),
            (8 <= self.max_seq_len <= 512, f"max-seq-len must be in [8, 512] tokens, got {self.max_seq_len}"),
            (self.partitioner != "natural" or self.dataset in NATURAL_DATASETS,
             f"partitioner 'natural' needs a dataset whose rows name their institution ({', '.join(NATURAL_DATASETS)}), "
             f"got {self.dataset!r}; use iid, dirichlet or pathological"),
            (bool(self.output_dir), "output-dir must not be empty"),
            (self.run_name or not self.resume,
             "resume = true needs run-name: the name of the run folder (in output-dir) to continue"),
        ]
        problems = [message for ok, message in checks if not ok]
        problems += _check_models(self) + _check_registries(self) + _check_secure_aggregation(self) + _check_privacy(self)
        if problems:
            raise ConfigError("bad run config: " + "; ".join(problems))

    @property
    def teacher_model_list(self) -> list[str]:
        """Teacher architectures, assigned to partitions round-robin."""
        return [name.strip() for name in self.teacher_models.split(",") if name.strip()]

    def teacher_model_for(self, partition_id: int) -> str:
        names = self.teacher_model_list
        return names[partition_id % len(names)]

    def local_epochs_for(self, num_examples: int) -> int:
        """Epochs of local training per round for an institution holding `num_examples` private rows:
        `local-epochs`, raised until the round takes at least `local-min-steps` optimiser steps of
        `teacher-batch-size` (0 = off). A few hundred images make only a handful of batches an epoch."""
        return self._epochs_for(num_examples, self.local_epochs, self.teacher_batch_size)

    def fedavg_epochs_for(self, num_examples: int) -> int:
        """The same for the FedAvg baseline's client step: `fedavg-local-epochs`, raised until the round takes at
        least `local-min-steps` steps of `fedavg-batch-size`."""
        return self._epochs_for(num_examples, self.fedavg_local_epochs, self.fedavg_batch_size)

    def _epochs_for(self, num_examples: int, epochs: int, batch_size: int) -> int:
        if self.local_min_steps == 0 or num_examples == 0:
            return epochs
        return max(epochs, math.ceil(self.local_min_steps / math.ceil(num_examples / batch_size)))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with kebab-case keys, as recorded in results.json."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def _coerce(key: str, value: Any, kind: type) -> tuple[Any, str | None]:
    """Check one value against its field type; ints are accepted where floats are expected."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if ok:
        return value, None
    return value, f"key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}"


def _check_models(cfg: RunConfig) -> list[str]:
    """Every model named is registered and fits the data set's task: exactly the tasks its `ModelSpec` declares."""
    names = cfg.teacher_model_list + [cfg.student_model]
    problems = [] if cfg.teacher_model_list else ["teacher-models must name at least one model"]
    problems += [unknown_model(name) for name in names if name not in MODELS]
    if cfg.student_model in MODELS and MODELS[cfg.student_model].teacher_only:
        problems.append(f"student-model {cfg.student_model!r} is a teacher only (its projection is fitted on the public "
                        "set at each institution); choose another student-model, such as cnn-student")
    if cfg.dataset not in DATASET_SPECS:  # reported by the dataset check
        return problems
    task = dataset_task(cfg.dataset)
    return problems + [
        f"model {name!r} does not fit dataset {cfg.dataset} ({task} task); models for it: {', '.join(models_for(task))}"
        for name in dict.fromkeys(names) if name in MODELS and task not in MODELS[name].tasks
    ]


def _check_privacy(cfg: RunConfig) -> list[str]:
    """The run's privacy mechanism and its parameters (the budget itself is each institution's own)."""
    checks = [
        (cfg.privacy in PRIVACY, f"privacy must be one of {PRIVACY}, got {cfg.privacy!r}"),
        (cfg.dp_noise_multiplier >= 0, f"dp-noise-multiplier must be >= 0 (0: calibrate to each budget), got {cfg.dp_noise_multiplier}"),
        (cfg.dp_max_grad_norm > 0, f"dp-max-grad-norm must be > 0, got {cfg.dp_max_grad_norm}"),
        (cfg.pate_teachers >= 2, f"pate-teachers must be >= 2, got {cfg.pate_teachers}"),
        (cfg.pate_queries >= 1, f"pate-queries must be >= 1, got {cfg.pate_queries}"),
        (cfg.pate_sigma >= 0, f"pate-sigma must be >= 0 (0: calibrate to each budget), got {cfg.pate_sigma}"),
    ]
    problems = [message for ok, message in checks if not ok]
    if cfg.privacy != "none" and cfg.revisit_epochs > 0:
        problems.append("revisit-epochs > 0 trains the teacher on private data outside the privacy mechanism; "
                        "set revisit-epochs = 0 with privacy, or privacy = \"none\"")
    if cfg.privacy != "none" and cfg.local_epochs < 1:
        problems.append(f"privacy {cfg.privacy!r} trains on private data each round: local-epochs must be >= 1, got {cfg.local_epochs}")
    if cfg.privacy != "none" and cfg.method == "fedavg":
        problems.append("privacy mechanisms apply to soft-label releases; the FedAvg baseline (method 'fedavg') has none")
    return problems


def _check_secure_aggregation(cfg: RunConfig) -> list[str]:
    """Secure aggregation shows the server only a sum: rules that need each institution's rows cannot run."""
    problems = []
    least = majority_threshold(cfg.num_clients)
    if cfg.secagg_threshold != 0 and not least <= cfg.secagg_threshold <= cfg.num_clients:
        problems.append(f"secagg-threshold must be 0 (a majority of each round's institutions, at least 3) or in "
                        f"[{least}, num-clients={cfg.num_clients}] (more than half of the institutions: every node refuses "
                        f"less), got {cfg.secagg_threshold}")
    if not cfg.secure_aggregation:
        return problems
    if cfg.aggregation in NEEDS_INDIVIDUAL_ROWS:
        problems.append(f"aggregation {cfg.aggregation!r} needs each institution's soft labels, which secure "
                        f"aggregation hides from the server; use 'mean' or 'weighted', or set secure-aggregation=false")
    if cfg.method == "fedavg":
        problems.append("secure-aggregation applies to soft labels; the FedAvg baseline (method 'fedavg') does not use it")
    if cfg.num_clients < 3 or cfg.min_clients < 2:
        problems.append("secure aggregation needs num-clients >= 3 and min-clients >= 2: with fewer, the sum reveals each input")
    return problems


def _check_registries(cfg: RunConfig) -> list[str]:
    """The aggregation rule and the codec are registered names."""
    problems = []
    if cfg.aggregation not in RULES:
        problems.append(f"aggregation must be one of {', '.join(RULES)}, got {cfg.aggregation!r}")
    if cfg.codec not in CODECS:
        problems.append(f"codec must be one of {', '.join(CODECS)}, got {cfg.codec!r}")
    return problems


def temperature_at(cfg: RunConfig, round_: int) -> float:
    """The round's distillation temperature: constant, or linear from `temperature` (round 1) to
    `temperature-final` (last round)."""
    if cfg.temperature_schedule == "constant" or cfg.num_server_rounds == 1:
        return cfg.temperature
    step = (round_ - 1) / (cfg.num_server_rounds - 1)
    return cfg.temperature + step * (cfg.temperature_final - cfg.temperature)


def default_run_config() -> dict[str, Any]:
    """The defaults of `[tool.flwr.app.config]`, read from the project's pyproject.toml."""
    if not PYPROJECT.is_file():
        raise ConfigError(f"cannot find {PYPROJECT}: run fedstill from its source checkout")
    with PYPROJECT.open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
