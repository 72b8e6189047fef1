"""The run folder: results.json, progress events, the student checkpoint, the accuracy plot and report.md.

Every file is written atomically (temporary file, then rename), so a crash never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from common.config import RunConfig
from server.results.report import write_report

RESULTS = "results.json"
PROGRESS = "progress.jsonl"
STUDENT = "student.safetensors"
STUDENT_CONFIG = "student.json"
PLOT = "accuracy.png"


def resolve_run_dir(cfg: RunConfig) -> Path:
    """`output-dir/run-name`, with `run-name` defaulting to `<scenario>-<UTC timestamp>`."""
    name = cfg.run_name or f"{cfg.scenario}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return Path(cfg.output_dir).expanduser().resolve() / name


@dataclass
class RunFolder:
    path: Path
    cfg: RunConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)  # extra results.json sections ("audit", ...)

    @classmethod
    def create(cls, cfg: RunConfig) -> RunFolder:
        path = resolve_run_dir(cfg)
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path, cfg)
        folder.event("started", rounds=cfg.num_server_rounds, pid=os.getpid())
        return folder

    def event(self, kind: str, **details: Any) -> None:
        """Append one line to progress.jsonl (read by `fedstill simulate` for its progress display)."""
        line = json.dumps({"event": kind, "time": time.time(), **details})
        with (self.path / PROGRESS).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def record_round(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        self.event("round", **{k: row[k] for k in ("round", "student_accuracy", "clients_replied", "wall_s")})

    def save_student(self, model: nn.Module, meta: dict[str, Any]) -> None:
        tmp = self.path / f".{STUDENT}.tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, self.path / STUDENT)
        write_json(self.path / STUDENT_CONFIG, meta)

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        results = {"status": "completed", "scenario": self.cfg.to_dict(), "rounds": self.rounds, "final": final,
                   **self.sections}
        write_json(self.path / RESULTS, results)
        plot_accuracy(self.rounds, final, self.path / PLOT)
        write_report(self.path, results)
        self.event("finished", status="completed")
        return results

    def fail(self, error: BaseException) -> None:
        """Keep what was done: the rounds completed so far, the reason, and the last student checkpoint."""
        reason = f"{type(error).__name__}: {error}"
        results = {"status": "failed", "error": reason, "scenario": self.cfg.to_dict(), "rounds": self.rounds,
                   "final": None, **self.sections}
        write_json(self.path / RESULTS, results)
        write_report(self.path, results)
        self.event("finished", status="failed", error=reason)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def plot_accuracy(rounds: list[dict[str, Any]], final: dict[str, Any], path: Path) -> None:
    """Student and ensemble accuracy per round, with the teachers' mean as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["student_accuracy"] for r in rounds], marker="o", label="student (test)")
    if all(r.get("ensemble_accuracy") is not None for r in rounds):
        ax.plot(xs, [r["ensemble_accuracy"] for r in rounds], marker="s", label="ensemble (public)")
    if final.get("teacher_accuracy_mean") is not None:
        ax.axhline(final["teacher_accuracy_mean"], color="grey", linestyle="--", label="teachers, mean (test)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(final.get("title", "fedstill"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
