"""ServerApp: each round queries the institutions for soft labels, aggregates and distils the student.

One round: query -> validate -> aggregate -> distil student -> evaluate -> checkpoint
(-> FedMD digest: the consensus goes back down). `method = "fedavg"` runs the weight-averaging
baseline instead (server/fedavg.py). With `resume = true` the run continues from the run folder's
checkpoint, after the last completed round (server/resume.py).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.aggregation import AggregationParams, running_aggregate
from common.aggregation.base import Aggregate
from common.config import RunConfig
from common.messages import DigestInstruction, SoftLabelQuery
from common.models.inputs import input_shape
from common.tasks.registry import load_split
from common.tasks.samples import FederatedSplit, public_fingerprint
from server.audit_trail import AuditTrail, check_coordinator_key
from server.checkpoint import Checkpoint
from server.distill import Student, ensemble_accuracy, target_temperature
from server.fedavg import run_fedavg
from server.profile import RoundClock, peak_rss_bytes
from server.results.figures import final_figures, round_row, run_title, student_meta
from server.results.privacy import privacy_section
from server.results.run_folder import STUDENT, RunFolder, resolve_run_dir
from server.resume import Checkpointer, plan_start
from server.rounds import (
    Pace,
    SoftLabels,
    digest_round,
    folding,
    make_query,
    require_quorum,
    soft_label_round,
    wait_for_nodes,
    witness_end,
)
from server.secure_rounds import check_secure_run, secure_soft_labels
from server.stopping import stop_note

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    check_secure_run(cfg)
    start = plan_start(cfg)  # refuses (ConfigError) before anything is written
    if start.done:
        log(WARNING, "%s", start.note)
        return
    if start.note:
        log(INFO, "%s", start.note)
    check_coordinator_key(cfg, resolve_run_dir(cfg))  # before anything is written
    run = RunFolder.create(cfg)
    trail, split = None, None
    try:
        trail = AuditTrail.open(cfg, run.path, context.run_id)
        keeper = Checkpointer.start(cfg, run, trail, start)
        split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
        nodes = wait_for_nodes(grid, cfg)
        run.event("nodes", count=len(nodes))
        if cfg.method == "fedavg":
            run_fedavg(grid, cfg, run, split, trail, keeper, start.checkpoint)
        else:
            run_distillation(grid, cfg, run, split, trail, keeper, start.checkpoint)
        keeper.finished()
    except BaseException as error:
        _record_end(grid, cfg, run, trail, split, error)
        raise


def _record_end(grid: Grid, cfg: RunConfig, run: RunFolder, trail: AuditTrail | None, split: FederatedSplit | None,
                error: BaseException) -> None:
    """A run that did not complete keeps its rounds and says why: stopped by Flower (`flwr stop`), or failed."""
    stopped = stop_note(error)
    if trail is not None:
        if stopped is not None:
            trail.stopped(stopped)  # Flower has closed the grid: nobody can witness this end
        else:
            trail.failed(error)
        if isinstance(error, Exception) and split is not None:
            _witness_after_failure(grid, cfg, trail, public_fingerprint(split.public))
        run.sections["audit"] = trail.summary()
        run.sections["privacy"] = privacy_section(cfg, trail.ledger.entries())
    if stopped is not None:
        run.stop(stopped)
    else:
        run.fail(error)


def _witness_after_failure(grid: Grid, cfg: RunConfig, trail: AuditTrail, fingerprint: str) -> None:
    """A failed run's record is witnessed too, as far as the institutions still answer."""
    try:
        witness_end(grid, cfg, trail, fingerprint, cfg.num_server_rounds)
    except Exception as problem:  # noqa: BLE001 - the run's own error is the one to report
        log(WARNING, "the failed run's final tree head could not be witnessed: %s", problem)


def run_distillation(grid: Grid, cfg: RunConfig, run: RunFolder, split: FederatedSplit, trail: AuditTrail,
                     keeper: Checkpointer, resumed: Checkpoint | None = None) -> None:
    public, test = split.public, split.test
    fingerprint = public_fingerprint(public)
    student = Student(cfg, public.num_classes, input_shape(public.inputs))
    if resumed is not None:
        student.restore(resumed.student, resumed.optimizers)
    log(INFO, "run folder %s; public set %d samples, fingerprint %s", run.path, len(public), fingerprint[:12])
    pace = Pace()

    for round_ in range(resumed.state.round + 1 if resumed else 1, cfg.num_server_rounds + 1):
        started, clock = time.monotonic(), RoundClock(trail.ledger)
        query = make_query(cfg, round_, fingerprint, len(public), public.num_classes)
        replies, ensemble = collect_and_aggregate(grid, cfg, trail, query, clock, pace)
        kept = query.sample_ids[ensemble.keep]
        trail.aggregated(round_, cfg.aggregation, sorted(replies.accepted), ensemble.probs, len(kept))
        with clock.phase("distil"):
            loss = student.distil(public, kept, ensemble.probs[ensemble.keep], round_,
                                  target_temperature(query.codec, query.temperature))
        with clock.phase("evaluate"):
            metrics = student.evaluate(test)
            ensemble_acc = ensemble_accuracy(ensemble.probs, public.labels[query.sample_ids])
        outcome = None
        if (cfg.digest_epochs or cfg.revisit_epochs) and round_ < cfg.num_server_rounds:
            instruction = DigestInstruction(round_, fingerprint, query.temperature, query.sample_ids, ensemble.probs,
                                            cfg.digest_epochs, cfg.revisit_epochs)
            outcome = digest_round(grid, cfg, trail, instruction, sorted(replies.accepted), pace)
        row = round_row(query, replies, metrics, ensemble_acc, loss, int(len(kept)), outcome,
                        round(time.monotonic() - started, 3), trail.institutions())
        run.record_round(row)
        with clock.phase("checkpoint"):
            run.save_student(student.model, student_meta(cfg, public.num_classes, input_shape(public.inputs), round_))
            entry = trail.checkpoint(round_, run.path / STUDENT, row.student_accuracy)
            keeper.save(round_, entry, student.model.state_dict(), student.optimizer_states())
        run.add_phases(round_, clock.phases(replies.accepted.values()))
        log(INFO, "round %d: student accuracy %.4f, %d replies", round_, row.student_accuracy, len(replies.accepted))

    trail.finished(cfg.num_server_rounds, run.path / STUDENT)
    witness_end(grid, cfg, trail, fingerprint, cfg.num_server_rounds)
    run.sections["audit"] = trail.summary()
    run.sections["privacy"] = privacy_section(cfg, trail.ledger.entries())
    run.finish(final_figures(run.rounds, student.params, run_title(cfg), peak_rss_bytes()))


def collect_and_aggregate(grid: Grid, cfg: RunConfig, trail: AuditTrail, query: SoftLabelQuery,
                          clock: RoundClock | None = None, pace: Pace | None = None) -> tuple[SoftLabels, Aggregate]:
    """Query every node (the slowest first by `pace`), check and record the replies, each folded into the round's
    running aggregate as it is judged (or, under secure aggregation, run the masked exchanges and open only the sum);
    `clock` times the phases."""
    clock = clock or RoundClock(trail.ledger)
    nodes = sorted(grid.get_node_ids())
    if cfg.secure_aggregation:
        with clock.phase("wait"):  # the masked protocol as a whole (server.profile)
            probs, masked = secure_soft_labels(grid, cfg, trail, query, nodes)
        require_quorum(masked, cfg, query.round)
        return masked, Aggregate(probs, np.ones(len(probs), dtype=bool))
    params = AggregationParams(cfg.era_temperature, cfg.trim_fraction, cfg.selective_threshold, query.temperature,
                               cfg.weight_clip)
    running = running_aggregate(cfg.aggregation, params)
    replies = soft_label_round(grid, cfg, trail, query, nodes, folding(running, trail), pace)
    clock.exchanged(replies)
    require_quorum(replies, cfg, query.round)
    with clock.phase("aggregate"):
        ensemble = running.result()
    trail.weights_clipped(query.round, list(replies.accepted), ensemble.clipped)
    return replies, ensemble
