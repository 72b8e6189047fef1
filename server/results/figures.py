"""What a distillation run records: the row of results.json for each round, the final figures, and the
student's metadata (student.json and the safetensors header)."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.config import RunConfig
from common.messages import SoftLabelQuery
from server.results.run_folder import RunFolder


def round_row(query: SoftLabelQuery, replies: Any, student_acc: float, ensemble_acc: float) -> dict[str, Any]:
    """The per-round record of results.json."""
    accepted = sorted(replies.accepted.items())
    return {
        "round": query.round,
        "temperature": query.temperature,
        "student_accuracy": student_acc,
        "ensemble_accuracy": ensemble_acc,
        "clients_replied": len(accepted),
        "clients_rejected": {str(n): reason for n, reason in sorted(replies.rejected.items())},
        "uplink_bytes": sum(replies.uplink_bytes.values()),
        "uplink_bytes_per_client": {str(n): b for n, b in sorted(replies.uplink_bytes.items())},
        "downlink_bytes": replies.downlink_bytes,
        "teacher_rounds": {str(n): r.teacher_rounds for n, r in accepted},
        "teacher_accuracy": {str(n): r.teacher_accuracy for n, r in accepted if r.teacher_accuracy >= 0},
        "teacher_params": {str(n): r.teacher_params for n, r in accepted},
    }


def final_figures(cfg: RunConfig, run: RunFolder, student_params: int) -> dict[str, Any]:
    teachers = dict(run.rounds[-1]["teacher_params"])  # the last round's institutions
    teacher_acc = list(run.rounds[-1]["teacher_accuracy"].values())
    metrics = run.rounds[-1].get("student_metrics") or {}  # balanced accuracy, macro-F1, AUROC (common.metrics)
    return {
        "student_accuracy": run.rounds[-1]["student_accuracy"],
        **{f"student_{name}": value for name, value in metrics.items()},
        "student_params": student_params,
        "teacher_accuracy_mean": float(np.mean(teacher_acc)) if teacher_acc else None,
        "teacher_accuracy_min": float(np.min(teacher_acc)) if teacher_acc else None,
        "teacher_accuracy_max": float(np.max(teacher_acc)) if teacher_acc else None,
        "teacher_params": teachers,
        "largest_teacher_params": max(teachers.values()),
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in run.rounds),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in run.rounds),
        "wall_s": round(sum(r["wall_s"] for r in run.rounds), 3),
        "title": f"{cfg.scenario}: {cfg.num_clients} clients, {cfg.partitioner}, {cfg.aggregation}",
    }


def student_meta(cfg: RunConfig, num_classes: int, image_size: tuple[int, ...], round_: int) -> dict:
    return {
        "model": cfg.student_model, "num_classes": num_classes, "image_size": list(image_size),
        "temperature": cfg.temperature, "round": round_, "dataset": cfg.dataset, "scenario": cfg.scenario,
    }
