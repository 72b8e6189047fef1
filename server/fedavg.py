"""The FedAvg baseline (McMahan et al., 2017) in the same harness: Flower's own `FedAvg` strategy
training the student architecture, with the same run folder. Its replies pass the same judge as every
other exchange (server/exchange.py, through `JudgedGrid`): each reply's attestation (the institution signs
the trained weights it releases and logs them) is checked by the audit trail, every reply, accepted or
rejected, and each round's average go into the ledger, and the bytes each way are measured.

It checkpoints after every round like distillation (the global weights; FedAvg keeps no server-side
optimizer) and resumes from there: Flower's loop then runs the remaining rounds, numbered from 1 in
its own log, and `MeasuredFedAvg` shifts them back to the run's round numbers."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from functools import partial
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.audit import kinds
from common.config import RunConfig
from common.errors import QuorumError
from common.messages import TrainReply
from common.models.inputs import input_shape
from common.models.registry import build_model, count_parameters
from common.models.training import evaluate as evaluate_model
from common.tasks.samples import FederatedSplit, public_fingerprint
from server.audit_trail import AuditTrail
from server.checkpoint import Checkpoint
from server.exchange import Exchange, Phase, exchange
from server.profile import RoundClock, peak_rss_bytes
from server.results.figures import final_figures, institution_names, run_title, split_metrics, student_meta
from server.results.run_folder import STUDENT, RunFolder
from server.results.schema import RoundPhases, RoundRow
from server.resume import Checkpointer
from server.rounds import witness_end

if TYPE_CHECKING:
    from flwr.supercore.run import Run

FEDAVG = Phase(kinds.FEDAVG_PHASE)


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, driven through a `JudgedGrid`: each round's replies are judged like every
    other exchange (server/exchange.py), their attestations checked and recorded by `trail`, and measured,
    with the rounds numbered as the run's. `fingerprint` is the public set's, which every attestation names."""

    def __init__(self, trail: AuditTrail, fingerprint: str, round_offset: int = 0, **kwargs: Any) -> None:
        super().__init__(weighted_by_key=TrainReply.weight_key, **kwargs)  # what each reply's schema check requires
        self.trail, self.fingerprint = trail, fingerprint
        self.round_offset = round_offset  # rounds completed before a resume
        self.round = round_offset  # the run's number of the round being trained
        self.exchanges: dict[int, Exchange[TrainReply]] = {}  # round -> its judged training exchange
        self.aggregate_s: dict[int, float] = {}  # round -> seconds Flower's average took (server.profile)

    @property
    def downlink(self) -> dict[int, int]:
        return {round_: judged.downlink_bytes for round_, judged in self.exchanges.items()}

    @property
    def uplink(self) -> dict[int, dict[str, int]]:
        return {round_: {str(n): b for n, b in judged.uplink_bytes.items()} for round_, judged in self.exchanges.items()}

    @property
    def replied(self) -> dict[int, int]:
        return {round_: len(judged.accepted) for round_, judged in self.exchanges.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.round = server_round + self.round_offset
        return super().configure_train(self.round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average of the accepted replies (the attestation, a ConfigRecord, is not read by it),
        recorded in the ledger with the digest of the result."""
        started = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)
        self.aggregate_s[self.round] = time.perf_counter() - started
        judged = self.exchanges.get(self.round)
        if arrays is not None and judged is not None:
            self.trail.weights_aggregated(self.round, sorted(judged.accepted), arrays)
        return arrays, metrics


class JudgedGrid(Grid):
    """The Grid that Flower's FedAvg drives, every exchange going through server/exchange.py: the strategy gets
    only the replies that pass (node error, then attestation, `AuditTrail.check_exchange`, then schema,
    `TrainReply.from_record`), ordered by node id; the exchange and every reply's judgement go into the ledger.
    Flower's own check of the replies would stop the run on one bad reply."""

    def __init__(self, grid: Grid, strategy: MeasuredFedAvg) -> None:
        self.grid, self.strategy = grid, strategy

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # the evaluate step, with fraction-evaluate 0
            return []
        round_, trail = self.strategy.round, self.strategy.trail
        trail.exchange_opened(FEDAVG.name, round_, {m.metadata.dst_node_id: m.content for m in messages})
        check = partial(trail.check_exchange, round_, self.strategy.fingerprint)
        judged = exchange(self.grid, messages, math.inf if timeout is None else timeout, TrainReply.from_record, check,
                          FEDAVG, round_, trail.witnessing)
        trail.record_replies(round_, judged, FEDAVG.name)
        self.strategy.exchanges[round_] = judged
        # by node id, not arrival order: the float sum of Flower's average then does not depend on which reply came
        # first, so a resumed or repeated run gives the same weights to the bit
        return [judged.replies[node] for node in sorted(judged.accepted)]

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


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
        trail, public_fingerprint(split.public), round_offset=done, fraction_train=1.0, fraction_evaluate=0.0,
        min_train_nodes=cfg.min_clients, min_available_nodes=cfg.min_clients,
    )
    started, clocks = [time.monotonic()], [RoundClock(trail.ledger)]

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        clock = clocks[0]
        with clock.phase("evaluate"):
            model.load_state_dict(arrays.to_torch_state_dict())
            acc, metrics = split_metrics(evaluate_model(model, test.inputs, test.labels))
        if flower_round == 0:
            clocks[0] = RoundClock(trail.ledger)  # round 1 starts after the initial evaluation
            return MetricRecord({"accuracy": acc})
        server_round = flower_round + done
        if strategy.replied.get(server_round, 0) < cfg.min_clients:
            raise QuorumError(f"round {server_round}: {strategy.replied.get(server_round, 0)} replies, min-clients is {cfg.min_clients}")
        uplink = strategy.uplink.get(server_round, {})
        judged = strategy.exchanges.get(server_round)
        checked, claimed = institution_names(judged, trail.institutions()) if judged is not None else (None, None)
        run.record_round(RoundRow(
            round=server_round, student_accuracy=acc, ensemble_accuracy=None,
            clients_replied=strategy.replied.get(server_round, 0), clients_rejected={},
            uplink_bytes=sum(uplink.values()), uplink_bytes_per_client=uplink,
            downlink_bytes=strategy.downlink.get(server_round, 0),
            wall_s=round(time.monotonic() - started[0], 3), student_metrics=metrics,
            institutions=checked, institutions_claimed=claimed,
        ))
        started[0] = time.monotonic()
        with clock.phase("checkpoint"):
            run.save_student(model, student_meta(cfg, test.num_classes, input_shape(test.inputs), server_round))
            keeper.save(server_round, trail.checkpoint(server_round, run.path / STUDENT, acc), model.state_dict())
        run.add_phases(server_round, fedavg_phases(clock, strategy, server_round))
        clocks[0] = RoundClock(trail.ledger)
        log(INFO, "fedavg round %d: accuracy %.4f", server_round, acc)
        return MetricRecord({"accuracy": acc})

    if done < cfg.num_server_rounds:
        strategy.start(grid=JudgedGrid(grid, strategy), initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=cfg.num_server_rounds - done, timeout=cfg.round_timeout, evaluate_fn=evaluate)
    if len(run.rounds) < cfg.num_server_rounds:
        raise QuorumError(f"FedAvg finished only {len(run.rounds)} of {cfg.num_server_rounds} rounds; see the log")
    trail.finished(cfg.num_server_rounds, run.path / STUDENT)
    witness_end(grid, cfg, trail, strategy.fingerprint, cfg.num_server_rounds)
    run.sections["audit"] = trail.summary()
    run.finish(final_figures(run.rounds, count_parameters(model), run_title(cfg), peak_rss_bytes()))


def fedavg_phases(clock: RoundClock, strategy: MeasuredFedAvg, round_: int) -> RoundPhases:
    """A FedAvg round's profile: the training exchange's wait and judging, Flower's average, the evaluation and
    checkpoint the clock timed, the ledger; no label nor distil."""
    judged = strategy.exchanges.get(round_)
    if judged is not None:
        clock.exchanged(judged)
    clock.add("aggregate", strategy.aggregate_s.get(round_, 0.0))
    return clock.phases(judged.accepted.values() if judged is not None else [])
