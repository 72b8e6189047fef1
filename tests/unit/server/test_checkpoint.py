"""The server's run checkpoint (server/checkpoint.py) and how a run starts from it (server/resume.py):
round trips of the student and its optimizers, atomic writes, and the decisions of `plan_start`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.errors import ConfigError
from common.tasks.registry import load_split
from server.audit_trail import LEDGER, AuditTrail
from server.checkpoint import (
    CHECKPOINT,
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
from server.distill import Student
from server.results.run_folder import RESULTS, RunFolder
from server.results.schema import RoundRow
from server.resume import Checkpointer, plan_start

RUN_ID = 2**63 - 7


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


def config(mapping: dict[str, Any], tmp_path: Path, **changes: Any) -> RunConfig:
    return RunConfig.from_run_config({
        **mapping, "dataset": "digits", "public-size": 400, "num-server-rounds": 3, "student-epochs": 1,
        "student-head-epochs": 1, "output-dir": str(tmp_path / "runs"), "run-name": "r", **changes,
    })


def state_for(cfg: RunConfig, round_: int, **changes: Any) -> CheckpointState:
    fields = dict(round=round_, num_server_rounds=cfg.num_server_rounds, method=cfg.method, config=resumable_config(cfg),
                  config_sha256=config_sha256(cfg), rounds=[{"round": r, "student_accuracy": 0.5} for r in range(1, round_ + 1)],
                  audit={"seq": 0, "hash": "", "ledger": "", "rejections": 0, "institutions": {}}, run_ids=["1"])
    return CheckpointState(**{**fields, **changes})


def trained_student(cfg: RunConfig, rounds: int) -> tuple[Student, Any]:
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed)
    student = Student(cfg, split.public.num_classes, tuple(split.public.images.shape[1:]))
    ids = np.arange(200, dtype=np.int64)
    targets = np.full((200, 10), 0.1, dtype=np.float32)
    for round_ in range(1, rounds + 1):
        student.distil(split.public, ids, targets, round_, cfg.temperature)
    return student, split


def with_ledger(cfg: RunConfig, round_: int = 1) -> tuple[Path, dict[str, Any]]:
    """A run folder whose ledger holds a student checkpoint of `round_`; its entry."""
    run = RunFolder.create(cfg)
    trail = AuditTrail.open(cfg, run.path, RUN_ID)
    (run.path / "student.safetensors").write_bytes(b"weights")
    return run.path, trail.checkpoint(round_, run.path / "student.safetensors", 0.5)


# ---------------------------------------------------------------------------------------- the file


def test_a_checkpoint_round_trips_the_student_its_optimizers_and_the_rows(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    student, _ = trained_student(cfg, rounds=2)
    state = state_for(cfg, 2)

    # Execute
    write_checkpoint(tmp_path, Checkpoint(state, student.model.state_dict(), student.optimizer_states()))
    back = read_checkpoint(tmp_path)

    # Assert
    assert back is not None and back.state.round == 2 and back.state.rounds == state.rounds
    assert back.state.config == resumable_config(cfg) and "resume" not in back.state.config
    for name, value in student.model.state_dict().items():
        assert torch.equal(back.student[name], value)
    for name, optimizer in student.optimizer_states().items():
        assert back.optimizers[name]["state"].keys() == optimizer["state"].keys() and optimizer["state"]
        for index, slots in optimizer["state"].items():
            for slot, value in slots.items():
                assert torch.equal(back.optimizers[name]["state"][index][slot], value), (name, index, slot)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_resumed_student_continues_exactly_as_one_never_stopped(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare: two rounds, checkpointed; a third round from the original and from the restored copy
    cfg = config(run_config_mapping, tmp_path)
    student, split = trained_student(cfg, rounds=2)
    write_checkpoint(tmp_path, Checkpoint(state_for(cfg, 2), student.model.state_dict(), student.optimizer_states()))
    saved = read_checkpoint(tmp_path)
    resumed = Student(cfg, split.public.num_classes, tuple(split.public.images.shape[1:]))
    resumed.restore(saved.student, saved.optimizers)
    ids, targets = np.arange(100, 300, dtype=np.int64), np.full((200, 10), 0.1, dtype=np.float32)

    # Execute
    student.distil(split.public, ids, targets, 3, cfg.temperature)
    resumed.distil(split.public, ids, targets, 3, cfg.temperature)

    # Assert: the optimizers' moments and step counts came back too, so the weights agree exactly
    for name, value in student.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_write_killed_before_the_rename_leaves_the_previous_checkpoint(run_config_mapping: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    weights = {"w": torch.ones(3)}
    write_checkpoint(tmp_path, Checkpoint(state_for(cfg, 1), weights, {}))

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("common.files.os.replace", killed)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, Checkpoint(state_for(cfg, 2), {"w": torch.zeros(3)}, {}))

    # Assert
    back = read_checkpoint(tmp_path)
    assert back.state.round == 1 and torch.equal(back.student["w"], torch.ones(3))


def test_an_unreadable_checkpoint_is_a_clear_config_error(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / CHECKPOINT).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")

    # Execute / Assert
    with pytest.raises(ConfigError, match="not a readable fedstill checkpoint.*move it aside"):
        read_state(tmp_path)


def test_mark_completed_keeps_everything_else(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    write_checkpoint(tmp_path, Checkpoint(state_for(cfg, 3), {"w": torch.arange(3.0)}, {}))

    # Execute
    mark_completed(tmp_path)

    # Assert
    back = read_checkpoint(tmp_path)
    assert back.state.completed is True and back.state.round == 3 and torch.equal(back.student["w"], torch.arange(3.0))


def test_config_differences_name_each_key_and_ignore_operational_ones(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    other = config(run_config_mapping, tmp_path, temperature=2.0, aggregation="median", resume=True,
                   **{"round-timeout": 5.0, "max-in-flight": 3})

    # Execute
    differences = config_differences(resumable_config(cfg), other)

    # Assert
    assert differences == ["aggregation: 'inferred-expertise' -> 'median'", "temperature: 5.0 -> 2.0"]
    assert config_sha256(cfg) == config_sha256(config(run_config_mapping, tmp_path, resume=True))


# ---------------------------------------------------------------------------------------- plan_start


def test_resume_needs_a_run_name(run_config_mapping: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume = true needs run-name"):
        config(run_config_mapping, tmp_path, resume=True, **{"run-name": ""})


def test_resume_without_a_checkpoint_starts_afresh_and_says_so(run_config_mapping: dict, tmp_path: Path) -> None:
    # Execute
    start = plan_start(config(run_config_mapping, tmp_path, resume=True))

    # Assert
    assert start.checkpoint is None and not start.done and start.first_round == 1
    assert "holds no checkpoint: starting the run afresh" in start.note


def test_an_unfinished_run_is_refused_without_resume(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    folder, entry = with_ledger(cfg)
    write_checkpoint(folder, Checkpoint(state_for(cfg, 1), {"w": torch.ones(1)}, {}))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())

    # Execute
    with pytest.raises(ConfigError) as refused:
        plan_start(cfg)

    # Assert: the message says what and how, and nothing was written
    assert str(refused.value) == (f"run folder {folder} holds an unfinished run stopped after round 1; set resume=true "
                                  f"to continue it or choose another run-name")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_a_failed_run_is_unfinished_too(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    folder, entry = with_ledger(cfg)
    write_checkpoint(folder, Checkpoint(state_for(cfg, 2), {"w": torch.ones(1)}, {}))
    (folder / RESULTS).write_text(json.dumps({"status": "failed"}), encoding="utf-8")

    # Execute / Assert
    with pytest.raises(ConfigError, match="stopped after round 2; set resume=true"):
        plan_start(cfg)


def test_resume_of_an_unfinished_run_starts_after_its_checkpoint(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    folder, entry = with_ledger(cfg)
    audit = {"seq": entry["seq"], "hash": entry["hash"], "ledger": entry["ledger"], "rejections": 2, "institutions": {}}
    write_checkpoint(folder, Checkpoint(state_for(cfg, 1, audit=audit), {"w": torch.ones(1)}, {}))

    # Execute
    start = plan_start(config(run_config_mapping, tmp_path, resume=True, **{"round-timeout": 10.0}))

    # Assert
    assert start.first_round == 2 and start.checkpoint.state.audit == audit and not start.done
    assert "resuming run folder" in start.note and "after round 1 of 3" in start.note


def test_resume_with_another_config_is_refused_naming_the_keys(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    folder, entry = with_ledger(cfg)
    write_checkpoint(folder, Checkpoint(state_for(cfg, 1), {"w": torch.ones(1)}, {}))

    # Execute
    with pytest.raises(ConfigError) as refused:
        plan_start(config(run_config_mapping, tmp_path, resume=True, seed=7, **{"num-server-rounds": 4}))

    # Assert
    message = str(refused.value)
    assert "another config: num-server-rounds: 3 -> 4; seed: 42 -> 7" in message and "choose another run-name" in message


def test_resume_refuses_a_ledger_that_lacks_the_checkpoint_entry(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    folder, entry = with_ledger(cfg)
    audit = {"seq": entry["seq"], "hash": "0" * 64, "ledger": entry["ledger"]}
    write_checkpoint(folder, Checkpoint(state_for(cfg, 1, audit=audit), {"w": torch.ones(1)}, {}))

    # Execute / Assert
    with pytest.raises(ConfigError, match="its ledger does not hold the checkpoint's entry"):
        plan_start(config(run_config_mapping, tmp_path, resume=True))


@pytest.mark.parametrize("marked_by", ["checkpoint", "results"])
def test_resume_of_a_completed_run_does_nothing(run_config_mapping: dict, tmp_path: Path, marked_by: str) -> None:
    # Prepare
    cfg = config(run_config_mapping, tmp_path)
    folder, entry = with_ledger(cfg)
    write_checkpoint(folder, Checkpoint(state_for(cfg, 3, completed=marked_by == "checkpoint"), {"w": torch.ones(1)}, {}))
    if marked_by == "results":
        (folder / RESULTS).write_text(json.dumps({"status": "completed"}), encoding="utf-8")

    # Execute
    start = plan_start(config(run_config_mapping, tmp_path, resume=True))

    # Assert
    assert start.done and "already holds a completed run of 3 round(s): nothing to resume, nothing rewritten" in start.note


def test_the_checkpointer_restores_rows_and_records_the_resume(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare: round 1 checkpointed, then round 2 opened before the server was killed
    cfg = config(run_config_mapping, tmp_path)
    run = RunFolder.create(cfg)
    first = AuditTrail.open(cfg, run.path, 111)
    keeper = Checkpointer.start(cfg, run, first, plan_start(cfg))
    (run.path / "student.safetensors").write_bytes(b"weights")
    row = RoundRow(round=1, student_accuracy=0.5, ensemble_accuracy=0.6, clients_replied=3, clients_rejected={},
                   uplink_bytes=0, uplink_bytes_per_client={}, downlink_bytes=0, wall_s=1.0)
    run.record_round(row)
    keeper.save(1, first.checkpoint(1, run.path / "student.safetensors", 0.5), {"w": torch.ones(2)})
    first.ledger.append("round-opened", {"round": 2})
    resumed_cfg = config(run_config_mapping, tmp_path, resume=True)
    start = plan_start(resumed_cfg)

    # Execute
    again = RunFolder.create(resumed_cfg)
    trail = AuditTrail.open(resumed_cfg, again.path, 222)
    keeper = Checkpointer.start(resumed_cfg, again, trail, start)

    # Assert
    assert again.rounds == [row]
    assert keeper.run_ids == ["111", "222"]
    last = trail.ledger.entries()[-1]
    assert last["kind"] == "run-resumed" and last["body"]["run_id"] == "222"
    assert (last["body"]["checkpoint_round"], last["body"]["interrupted_run_ids"], last["body"]["abandoned_rounds"]) == (1, ["111"], [2])
    events = [json.loads(line)["event"] for line in (run.path / "progress.jsonl").read_text().splitlines()]
    assert events[-2:] == ["started", "resumed"] and "checkpoint" in events
    assert (run.path / LEDGER).is_file() and os.path.exists(run.path / CHECKPOINT)
