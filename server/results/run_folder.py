"""The run folder: results.json, progress events, the student checkpoint, the accuracy plot and report.md.

results.json's rows, final figures and student.json are the typed records of server/results/schema.py; the
one way a later command (`fedstill evaluate`, `export`, `bench`) adds to results.json is `add_section`.

Every file is written atomically (common/files.py), so a crash never leaves a torn file, and owner-only (0600, in a
run folder of mode 0700): the records are the coordinator's and its institutions' business only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.files import PRIVATE, atomic_path, atomic_write_text, open_private, private_folder
from server.results.report import write_report
from server.results.schema import FinalFigures, RoundPhases, RoundRow, StudentMeta

RESULTS = "results.json"
PROGRESS = "progress.jsonl"
STUDENT = "student.safetensors"
STUDENT_CONFIG = "student.json"
PLOT = "accuracy.png"
COMPLETED, FAILED, STOPPED = "completed", "failed", "stopped"  # results.json's `status` (STOPPED: by `flwr stop`)


def resolve_run_dir(cfg: RunConfig) -> Path:
    """`output-dir/run-name`, with `run-name` defaulting to `<scenario>-<UTC timestamp>`."""
    name = cfg.run_name or f"{cfg.scenario}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    return Path(cfg.output_dir).expanduser().resolve() / name


@dataclass
class RunFolder:
    path: Path
    cfg: RunConfig
    rounds: list[RoundRow] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)  # results.json's "audit" and "privacy", as JSON

    @classmethod
    def create(cls, cfg: RunConfig) -> RunFolder:
        path = resolve_run_dir(cfg)
        private_folder(path, tighten=True)
        folder = cls(path, cfg)
        folder.event("started", rounds=cfg.num_server_rounds, pid=os.getpid())
        return folder

    def event(self, kind: str, **details: Any) -> None:
        """Append one line to progress.jsonl (read by `fedstill simulate` for its progress display)."""
        line = json.dumps({"event": kind, "time": time.time(), **details})
        with open_private(self.path / PROGRESS) as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def record_round(self, row: RoundRow) -> None:
        self.rounds.append(row)
        self.event("round", round=row.round, student_accuracy=row.student_accuracy,
                   clients_replied=row.clients_replied, wall_s=row.wall_s)

    def add_phases(self, round_: int, phases: RoundPhases) -> None:
        """Give round `round_`'s row (the last one) its profile, measured to the end of its checkpoint."""
        if not self.rounds or self.rounds[-1].round != round_:
            raise ValueError(f"add_phases: round {round_} is not the last recorded round")
        self.rounds[-1] = replace(self.rounds[-1], phases=phases)

    def save_student(self, model: nn.Module, meta: StudentMeta) -> None:
        with atomic_path(self.path / STUDENT, mode=PRIVATE) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta.header())
        write_json(self.path / STUDENT_CONFIG, meta.to_json())

    def finish(self, final: FinalFigures) -> dict[str, Any]:
        results = {"status": COMPLETED, "scenario": self.cfg.to_dict(), "rounds": self.rows_json(),
                   "final": final.to_json(), **self.sections}
        write_json(self.path / RESULTS, results)
        plot_accuracy(self.rounds, final, self.path / PLOT)
        write_report(self.path, results)
        self.event("finished", status=COMPLETED)
        return results

    def fail(self, error: BaseException) -> None:
        """Keep what was done: the rounds completed so far, the reason, and the last student checkpoint."""
        self._end_early(FAILED, f"{type(error).__name__}: {error}")

    def stop(self, note: str) -> None:
        """Flower stopped the run (`flwr stop`, server/stopping.py): kept as a failed run is, with status "stopped"."""
        self._end_early(STOPPED, note)

    def _end_early(self, status: str, reason: str) -> None:
        results = {"status": status, "error": reason, "scenario": self.cfg.to_dict(), "rounds": self.rows_json(),
                   "final": None, **self.sections}
        write_json(self.path / RESULTS, results)
        write_report(self.path, results)
        self.event("finished", status=status, error=reason)

    def rows_json(self) -> list[dict[str, Any]]:
        """results.json's `rounds` (and the checkpoint's): every row so far, as JSON."""
        return [row.to_json() for row in self.rounds]


def add_section(run_dir: Path, name: str, section: dict[str, Any]) -> dict[str, Any]:
    """Put `section` into the run's results.json under `name` (replacing an older one) and re-render report.md:
    read, add, write atomically, then render, so the two never disagree."""
    path = Path(run_dir) / RESULTS
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot add '{name}' to {path}: {error}. Give the folder of a finished run "
                          f"(the one holding results.json).") from error
    results[name] = section
    write_json(path, results)
    write_report(Path(run_dir), results)
    return results


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=json_default) + "\n", mode=PRIVATE)


def json_default(value: Any) -> Any:
    """`json.dumps`'s `default=`: a numpy or torch scalar as its Python value; anything else is refused."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def plot_accuracy(rounds: list[RoundRow], final: FinalFigures, path: Path) -> None:
    """Student and ensemble accuracy per round, with the teachers' mean as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.round for r in rounds]
    ax.plot(xs, [r.student_accuracy for r in rounds], marker="o", label="student (test)")
    ensemble = [r.ensemble_accuracy for r in rounds if r.ensemble_accuracy is not None]  # none in a FedAvg run
    if len(ensemble) == len(rounds):
        ax.plot(xs, ensemble, marker="s", label="ensemble (public)")
    if final.teacher_accuracy_mean is not None:
        ax.axhline(final.teacher_accuracy_mean, color="grey", linestyle="--", label="teachers, mean (test)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(final.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, mode=PRIVATE, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
