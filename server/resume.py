"""Starting a run in its run folder: afresh, or (`resume = true`) from the checkpoint of an interrupted run.

`plan_start` reads the folder before anything is written to it and decides; `Checkpointer` writes the
checkpoint after every completed round and marks it completed when the run finishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.errors import ConfigError
from server.audit_trail import LEDGER, AuditTrail, ledger_holds
from server.checkpoint import (
    Checkpoint,
    CheckpointState,
    config_differences,
    config_sha256,
    mark_completed,
    read_checkpoint,
    read_state,
    resumable_config,
    write_checkpoint,
)
from server.results.run_folder import RESULTS, RunFolder, resolve_run_dir
from server.results.schema import RoundRow


@dataclass(frozen=True)
class Start:
    """How this run starts: `checkpoint` to resume from (None: afresh), `done` when there is nothing to do."""

    run_dir: Path
    checkpoint: Checkpoint | None = None
    done: bool = False
    note: str = ""  # what was decided, for the log and the progress events

    @property
    def first_round(self) -> int:
        return self.checkpoint.state.round + 1 if self.checkpoint else 1


def plan_start(cfg: RunConfig) -> Start:
    """Decide, from the run folder alone, whether this run starts afresh, resumes, or is refused.

    Raises ConfigError (before anything is written) for an unfinished run without `resume = true`, or
    a checkpoint made with another config.
    """
    run_dir = resolve_run_dir(cfg)
    state = read_state(run_dir) if cfg.run_name else None
    if state is None:
        note = f"resume=true, but run folder {run_dir} holds no checkpoint: starting the run afresh" if cfg.resume else ""
        return Start(run_dir, note=note)
    if state.completed or _results_status(run_dir) == "completed":
        if cfg.resume:
            return Start(run_dir, done=True, note=f"run folder {run_dir} already holds a completed run of {state.round} "
                                                  f"round(s): nothing to resume, nothing rewritten (results in {run_dir / RESULTS})")
        return Start(run_dir)  # a new run over a finished one, as without checkpoints
    if not cfg.resume:
        raise ConfigError(f"run folder {run_dir} holds an unfinished run stopped after round {state.round}; set "
                          f"resume=true to continue it or choose another run-name")
    if differences := config_differences(state.config, cfg):
        raise ConfigError(f"cannot resume run folder {run_dir}: its checkpoint (round {state.round}) was made with "
                          f"another config: {'; '.join(differences)}; resume with the same settings (only "
                          f"resume, round-timeout and node-wait-timeout may change) or choose another run-name")
    audit = state.audit
    if not ledger_holds(run_dir, audit.get("seq", -1), audit.get("hash", "")):
        raise ConfigError(f"cannot resume run folder {run_dir}: its ledger does not hold the checkpoint's entry "
                          f"{audit.get('seq')} (hash {str(audit.get('hash'))[:16]}...); the ledger was replaced or "
                          f"cut: run `fedstill audit verify {run_dir / LEDGER}`, or choose another run-name")
    checkpoint = read_checkpoint(run_dir)
    return Start(run_dir, checkpoint, note=f"resuming run folder {run_dir} after round {state.round} of "
                                           f"{cfg.num_server_rounds} (Flower runs so far: {', '.join(state.run_ids)})")


def _results_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RESULTS).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Checkpointer:
    """Writes the run folder's checkpoint after each completed round, carrying what earlier runs recorded."""

    cfg: RunConfig
    run: RunFolder
    trail: AuditTrail
    run_ids: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, cfg: RunConfig, run: RunFolder, trail: AuditTrail, start: Start) -> Checkpointer:
        """Restore the rows and audit state of `start.checkpoint` (if any) and record the resume in the ledger."""
        earlier: list[str] = []
        if start.checkpoint is not None:
            state = start.checkpoint.state
            run.rounds = [RoundRow.from_json(row) for row in state.rounds]
            trail.resumed(state.round, state.audit, state.run_ids)
            earlier = list(state.run_ids)
            run.event("resumed", round=state.round, run_ids=earlier, note=start.note)
        elif (attempt := trail.unfinished_attempt()) is not None:  # stopped in its first round: nothing to resume
            trail.resumed(0, {"seq": attempt["seq"], "hash": attempt["hash"]}, [attempt["body"]["run_id"]])
            run.event("resume-skipped", note=start.note or "the earlier run stopped before completing a round: starting afresh")
        elif start.note:
            run.event("resume-skipped", note=start.note)
        return cls(cfg, run, trail, earlier + [trail.run_id])

    def save(self, round_: int, ledger_entry: dict[str, Any], student: dict[str, torch.Tensor],
             optimizers: dict[str, dict[str, Any]] | None = None) -> None:
        """After round `round_` (whose `student-checkpoint` ledger entry is `ledger_entry`)."""
        state = CheckpointState(
            round=round_, num_server_rounds=self.cfg.num_server_rounds, method=self.cfg.method,
            config=resumable_config(self.cfg), config_sha256=config_sha256(self.cfg), rounds=self.run.rows_json(),
            audit=self.trail.head(ledger_entry), run_ids=self.run_ids,
        )
        write_checkpoint(self.run.path, Checkpoint(state, student, optimizers or {}))
        self.run.event("checkpoint", round=round_, ledger_seq=ledger_entry["seq"])

    def finished(self) -> None:
        mark_completed(self.run.path)
