"""A finished run's student, read back from its run folder with the config and data split it was made for.

`fedstill export`, `evaluate` and `bench` start here: `student.json` names the architecture and its
input shape, `student.safetensors` holds the weights, and `results.json` the resolved scenario, from
which the same public/test split is rebuilt (public set for calibration, test set for every figure).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from common.config import RunConfig, default_run_config
from common.errors import ConfigError, DataError
from common.models.registry import build_model
from common.tasks.registry import load_split
from common.tasks.samples import FederatedSplit
from server.results.run_folder import RESULTS, STUDENT, STUDENT_CONFIG
from server.results.schema import StudentMeta


@dataclass(frozen=True)
class RunStudent:
    run_dir: Path
    cfg: RunConfig  # the run's resolved scenario (keys newer than the run take their defaults)
    meta: StudentMeta  # student.json: model, num_classes, input_shape (one sample's), round, ...
    model: nn.Module  # in eval mode
    results: dict[str, Any]  # results.json: rounds, final figures

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.meta.input_shape)


def load_run_student(run_dir: Path, data_dir: str | None = None) -> RunStudent:
    """Read the student of the run in `run_dir`; `data_dir` replaces the run's data-dir (data moved)."""
    run_dir = Path(run_dir)
    for name in (RESULTS, STUDENT_CONFIG, STUDENT):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} holds no {name}: not a run folder, or its run finished no round; "
                              f"pass the folder a `fedstill simulate` run wrote (runs/<scenario>-<time>/)")
    results = _read_json(run_dir / RESULTS)
    meta = _read_meta(run_dir / STUDENT_CONFIG)
    defaults = default_run_config()
    scenario = {k: v for k, v in (results.get("scenario") or {}).items() if k in defaults}  # keys since removed: dropped
    if data_dir:
        scenario["data-dir"] = data_dir
    cfg = RunConfig.from_run_config({**defaults, **scenario})
    try:
        weights = load_file(str(run_dir / STUDENT))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"cannot read {run_dir / STUDENT}: {error}; the file is corrupt") from None
    model = build_model(meta.model, meta.num_classes, meta.input_shape)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ConfigError(f"{run_dir / STUDENT} does not fit model {meta.model!r} of {run_dir / STUDENT_CONFIG}: "
                          f"{str(error).splitlines()[0]}") from None
    return RunStudent(run_dir, cfg, meta, model.eval(), results)


def load_run_split(student: RunStudent) -> FederatedSplit:
    """The run's public/private/test split, rebuilt from its scenario (same data, sizes and seed)."""
    cfg = student.cfg
    return load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64: (n, C) -> (n, C), rows sum to 1."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def torch_logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Logits (n, C) float32 of `model` on model inputs `x`, in eval and inference mode."""
    model.eval()
    with torch.inference_mode():
        parts = [model(x[start:start + batch]) for start in range(0, len(x), batch)]
    return torch.cat(parts).float().numpy() if parts else np.zeros((0, 0), dtype=np.float32)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}; the run folder is damaged") from None


def _read_meta(path: Path) -> StudentMeta:
    """student.json; one written before `input_shape` had its name holds it as `image_size`, read the same."""
    try:
        return StudentMeta.from_json(_read_json(path))
    except DataError as error:
        raise ConfigError(f"cannot read {path}: {error}; the run folder is damaged") from None
