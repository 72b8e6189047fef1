"""The run's resumable state after each completed round, in one atomically written file.

`<run folder>/checkpoint.safetensors` holds the student's weights and its optimizers' state as tensors,
and, in the safetensors header, one JSON document (`CheckpointState`): the round, the rounds rows of
results.json so far, the optimizers' settings, the audit ledger's head at the checkpoint, and the run
config with its digest. It is written to a temporary file, fsync'd, then renamed over the old one, so
a kill at any moment leaves either the previous round's checkpoint or this one, never a torn file.

Everything else a round needs is a pure function of the config and the round number (the query's
public samples, the temperature schedule, the training seeds), and the privacy section is rebuilt
from the ledger, so nothing more is kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from common.audit.canonical import canonical, sha256_hex
from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from common.files import PRIVATE, atomic_path
from server.results.run_folder import json_default

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1
HEADER_KEY = "fedstill-checkpoint"
STUDENT_PREFIX = "student/"
OPTIMIZER_PREFIX = "optimizer/"
# Keys a resumed run may change: they steer the run's operation, not what it computes.
OPERATIONAL_KEYS = frozenset({"resume", "round-timeout", "node-wait-timeout", "max-in-flight"})  # how, not what


@dataclass
class CheckpointState:
    """The JSON half of a checkpoint (the tensors are the student and its optimizers)."""

    round: int  # the last completed round
    num_server_rounds: int
    method: str
    config: dict[str, Any]  # the resolved run config, operational keys left out
    config_sha256: str
    rounds: list[dict[str, Any]]  # results.json's rows 1..round
    audit: dict[str, Any]  # ledger head at the checkpoint: seq, hash, ledger id; rejections, institutions
    run_ids: list[str]  # every Flower run id that worked on this run folder, oldest first
    optimizers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> param_groups
    completed: bool = False  # set once results.json says "completed"
    format: int = FORMAT


@dataclass
class Checkpoint:
    state: CheckpointState
    student: dict[str, torch.Tensor]  # the student's state_dict
    optimizers: dict[str, dict[str, Any]]  # name -> optimizer state_dict, ready for load_state_dict


def resumable_config(cfg: RunConfig) -> dict[str, Any]:
    """The config that a resumed run must share with the checkpoint: all but OPERATIONAL_KEYS."""
    return {key: value for key, value in cfg.to_dict().items() if key not in OPERATIONAL_KEYS}


def config_sha256(cfg: RunConfig) -> str:
    return sha256_hex(canonical(resumable_config(cfg)))


def config_differences(recorded: dict[str, Any], cfg: RunConfig) -> list[str]:
    """`key: checkpoint value -> this run's value`, for every key that differs (or exists on one side only).

    A key newer than the checkpoint counts as its default (the checkpoint's run had no other value)."""
    wanted = resumable_config(cfg)
    defaults = default_run_config()
    recorded = {**{key: defaults[key] for key in wanted.keys() - recorded.keys() if key in defaults}, **recorded}
    missing = object()
    return [
        f"{key}: {recorded.get(key, missing)!r} -> {wanted.get(key, missing)!r}".replace(repr(missing), "(absent)")
        for key in sorted(set(recorded) | set(wanted)) if recorded.get(key, missing) != wanted.get(key, missing)
    ]


def write_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint.safetensors` atomically: temporary file, fsync, rename, fsync of the folder."""
    tensors = {STUDENT_PREFIX + name: value for name, value in checkpoint.student.items()}
    groups = {}
    for name, optimizer_state in checkpoint.optimizers.items():
        groups[name] = [_jsonable_group(group) for group in optimizer_state["param_groups"]]
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                tensors[f"{OPTIMIZER_PREFIX}{name}/{index}/{key}"] = value
    checkpoint.state.optimizers = groups
    header = json.dumps(asdict(checkpoint.state), default=json_default)
    path = Path(run_dir) / CHECKPOINT
    with atomic_path(path, mode=PRIVATE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={HEADER_KEY: header})
    return path


def read_state(run_dir: Path) -> CheckpointState | None:
    """The JSON half of the run folder's checkpoint (cheap: the header only), or None when there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(HEADER_KEY)
        data = json.loads(header) if header else None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"no {HEADER_KEY} header of format {FORMAT}")
        return CheckpointState(**data)
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not a readable fedstill checkpoint ({error}); move it aside to start the run "
                          f"afresh, or choose another run-name") from None


def read_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The whole checkpoint (tensors included), or None when the run folder holds none."""
    state = read_state(run_dir)
    if state is None:
        return None
    tensors = load_file(str(Path(run_dir) / CHECKPOINT))
    student = {k.removeprefix(STUDENT_PREFIX): v for k, v in tensors.items() if k.startswith(STUDENT_PREFIX)}
    optimizers = {}
    for name, groups in state.optimizers.items():
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"{OPTIMIZER_PREFIX}{name}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, slot = key.removeprefix(prefix).split("/", 1)
                per_param.setdefault(int(index), {})[slot] = value
        optimizers[name] = {"state": per_param, "param_groups": groups}
    return Checkpoint(state, student, optimizers)


def mark_completed(run_dir: Path) -> None:
    """Record in the checkpoint that the run finished (results.json holds the final figures)."""
    checkpoint = read_checkpoint(run_dir)
    if checkpoint is not None:
        checkpoint.state.completed = True
        write_checkpoint(run_dir, checkpoint)


def _jsonable_group(group: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
