"""The FedAvg baseline (McMahan et al., 2017) in the same harness: Flower's own `FedAvg` strategy
training the student architecture, with the bytes each way measured and the same run folder.

It checkpoints after every round like distillation (the global weights; FedAvg keeps no server-side
optimizer) and resumes from there: Flower's loop then runs the remaining rounds, numbered from 1 in
its own log, and `MeasuredFedAvg` shifts them back to the run's round numbers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.tasks.samples import FederatedSplit
from common.messages import record_nbytes
from common.models.registry import build_model, count_parameters, input_shape
from common.models.training import evaluate as evaluate_model
from common.errors import QuorumError
from server.audit_trail import AuditTrail
from server.checkpoint import Checkpoint
from server.resume import Checkpointer
from server.results.run_folder import STUDENT, RunFolder

INFO = 20


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, but counting the bytes of every message it sends and receives."""

    def __init__(self, round_offset: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.round_offset = round_offset  # rounds completed before a resume
        self.downlink: dict[int, int] = {}
        self.uplink: dict[int, dict[str, int]] = {}
        self.replied: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.downlink[server_round] = sum(record_nbytes(m.content) for m in messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        self.uplink[server_round] = {str(r.metadata.src_node_id): record_nbytes(r.content) for r in good}
        self.replied[server_round] = len(good)
        for reply in replies:
            if reply.has_error():
                log(30, "round %d: node %d failed: %s", server_round, reply.metadata.src_node_id, reply.error.reason)
        return super().aggregate_train(server_round, replies)


def run_fedavg(
    grid: Grid, cfg: RunConfig, run: RunFolder, split: FederatedSplit, trail: AuditTrail, keeper: Checkpointer,
    resumed: Checkpoint | None = None,
) -> None:
    """`num-server-rounds` of FedAvg on the student architecture; every node trains `local-epochs`."""
    test = split.test
    model = build_model(cfg.student_model, test.num_classes, input_shape(test.inputs), seed=cfg.seed)
    done = 0
    if resumed is not None:
        model.load_state_dict(resumed.student)
        done = resumed.state.round
        log(INFO, "FedAvg resumes after round %d: Flower's log counts the %d remaining rounds from 1", done,
            cfg.num_server_rounds - done)
    strategy = MeasuredFedAvg(
        round_offset=done, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
    )
    started = [time.monotonic()]

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate_model(model, test.inputs, test.labels)
        acc = metrics.pop("accuracy")
        if flower_round == 0:
            return MetricRecord({"accuracy": acc})
        server_round = flower_round + done
        if strategy.replied.get(server_round, 0) < cfg.min_clients:
            raise QuorumError(f"round {server_round}: {strategy.replied.get(server_round, 0)} replies, min-clients is {cfg.min_clients}")
        uplink = strategy.uplink.get(server_round, {})
        run.record_round({
            "round": server_round, "student_accuracy": acc, "ensemble_accuracy": None,
            "clients_replied": strategy.replied.get(server_round, 0), "clients_rejected": {},
            "uplink_bytes": sum(uplink.values()), "uplink_bytes_per_client": uplink,
            "downlink_bytes": strategy.downlink.get(server_round, 0),
            "wall_s": round(time.monotonic() - started[0], 3), "student_metrics": metrics,
        })
        started[0] = time.monotonic()
        run.save_student(model, {"model": cfg.student_model, "num_classes": test.num_classes,
                                 "image_size": list(input_shape(test.inputs)), "round": server_round,
                                 "method": "fedavg", "dataset": cfg.dataset, "scenario": cfg.scenario})
        keeper.save(server_round, trail.checkpoint(server_round, run.path / STUDENT, acc), model.state_dict())
        log(INFO, "fedavg round %d: accuracy %.4f", server_round, acc)
        return MetricRecord({"accuracy": acc})

    if done < cfg.num_server_rounds:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_server_rounds - done,
                       timeout=cfg.round_timeout, evaluate_fn=evaluate)
    if len(run.rounds) < cfg.num_server_rounds:
        raise QuorumError(f"FedAvg finished only {len(run.rounds)} of {cfg.num_server_rounds} rounds; see the log")
    run.sections["audit"] = trail.finished(cfg.num_server_rounds, run.path / STUDENT)
    run.finish({
        "student_accuracy": run.rounds[-1]["student_accuracy"],
        **{f"student_{name}": value for name, value in (run.rounds[-1].get("student_metrics") or {}).items()},
        "student_params": count_parameters(model),
        "teacher_accuracy_mean": None, "teacher_params": {}, "largest_teacher_params": None,
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in run.rounds),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in run.rounds),
        "wall_s": round(sum(r["wall_s"] for r in run.rounds), 3),
        "title": f"{cfg.scenario}: FedAvg, {cfg.num_clients} clients",
    })
