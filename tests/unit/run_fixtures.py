"""Tiny finished run folders (digits 8x8 images; BBC News at 32 tokens) for the export, evaluation and bench tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from common.config import RunConfig, default_run_config
from common.models.inputs import input_shape
from common.models.registry import build_model, count_parameters
from common.models.training import train_supervised
from common.tasks.registry import load_split
from server.results.figures import final_figures, run_title, student_meta
from server.results.run_folder import RESULTS, STUDENT, STUDENT_CONFIG, write_json
from server.results.schema import RoundRow

TINY_RUN = {"dataset": "digits", "public-size": 400, "num-clients": 2, "min-clients": 1, "partitioner": "iid",
            "num-server-rounds": 2, "local-epochs": 1, "teacher-models": "cnn-small,mlp", "student-model": "cnn-student"}


def tiny_cfg(**overrides: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), **TINY_RUN, **overrides})


TINY_TEXT_RUN = {"dataset": "bbc-news", "public-size": 600, "max-seq-len": 32, "teacher-models": "bert-tiny",
                 "student-model": "bert-tiny", "temperature": 2.0}


def make_run_folder(path: Path, epochs: int = 8, lr: float = 0.01, **overrides: Any) -> Path:
    """A run folder as `fedstill simulate` leaves it: the student (trained on the labelled public set, which
    stands in for distillation), student.json and results.json with the scenario and rounds."""
    cfg = tiny_cfg(**overrides)
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    shape, classes = input_shape(split.public.inputs), split.public.num_classes
    model = build_model(cfg.student_model, classes, shape, seed=cfg.seed)
    train_supervised(model, split.public.inputs, split.public.labels, epochs=epochs, lr=lr, batch_size=32, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / STUDENT))
    write_json(path / STUDENT_CONFIG, student_meta(cfg, classes, shape, cfg.num_server_rounds).to_json())
    rounds = [RoundRow(round=r, temperature=cfg.temperature, student_accuracy=0.0, ensemble_accuracy=None,
                       clients_replied=0, clients_rejected={}, uplink_bytes=0, uplink_bytes_per_client={},
                       downlink_bytes=0, teacher_rounds={}, teacher_accuracy={}, teacher_params={}, wall_s=0.0)
              for r in range(1, cfg.num_server_rounds + 1)]
    final = final_figures(rounds, count_parameters(model), run_title(cfg))
    write_json(path / RESULTS, {"status": "completed", "scenario": cfg.to_dict(), "rounds": [r.to_json() for r in rounds],
                                "final": final.to_json()})
    return path
