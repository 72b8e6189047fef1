"""ServerApp: each round queries the institutions for soft labels, aggregates and distils the student.

One round: query -> validate -> aggregate -> distil student -> evaluate -> checkpoint.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.aggregation import aggregate
from common.config import RunConfig
from common.data import load_split, public_fingerprint
from server.distill import Student, ensemble_accuracy
from server.rounds import make_query, query_soft_labels, require_quorum, wait_for_nodes
from server.run_folder import RunFolder

INFO = 20
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    run = RunFolder.create(cfg)
    try:
        run_rounds(grid, cfg, run)
    except BaseException as error:
        run.fail(error)
        raise


def run_rounds(grid: Grid, cfg: RunConfig, run: RunFolder) -> None:
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    public, test = split.public, split.test
    fingerprint = public_fingerprint(public)
    student = Student(cfg, public.num_classes, tuple(public.images.shape[1:]))
    log(INFO, "run folder %s; public set %d samples, fingerprint %s", run.path, len(public), fingerprint[:12])
    nodes = wait_for_nodes(grid, cfg)
    run.event("nodes", count=len(nodes))

    last = None
    for round_ in range(1, cfg.num_server_rounds + 1):
        started = time.monotonic()
        query = make_query(cfg, round_, fingerprint, len(public), public.num_classes)
        replies = query_soft_labels(grid, sorted(grid.get_node_ids()), query, cfg.round_timeout)
        require_quorum(replies, cfg, round_)

        accepted = list(replies.accepted.values())
        ensemble = aggregate(cfg.aggregation, [r.soft_labels for r in accepted], [r.num_examples for r in accepted])
        loss = student.distil(public, query.sample_ids, ensemble, round_)
        row = {
            "round": round_,
            "student_accuracy": student.accuracy(test),
            "ensemble_accuracy": ensemble_accuracy(ensemble, public.labels[query.sample_ids]),
            "student_loss": loss,
            "clients_replied": len(accepted),
            "clients_rejected": {str(n): reason for n, reason in sorted(replies.rejected.items())},
            "uplink_bytes": sum(replies.uplink_bytes.values()),
            "uplink_bytes_per_client": {str(n): b for n, b in sorted(replies.uplink_bytes.items())},
            "downlink_bytes": replies.downlink_bytes,
            "teacher_rounds": {str(n): r.teacher_rounds for n, r in sorted(replies.accepted.items())},
            "teacher_accuracy": {str(n): r.teacher_accuracy for n, r in sorted(replies.accepted.items())
                                 if r.teacher_accuracy >= 0},
            "wall_s": round(time.monotonic() - started, 3),
        }
        run.record_round(row)
        run.save_student(student.model, student_meta(cfg, public.num_classes, public.images.shape[1:], round_))
        log(INFO, "round %d: student accuracy %.4f, %d replies", round_, row["student_accuracy"], len(accepted))
        last = replies

    teachers = {str(n): r.teacher_params for n, r in sorted(last.accepted.items())}
    teacher_acc = list(run.rounds[-1]["teacher_accuracy"].values())
    run.finish({
        "student_accuracy": run.rounds[-1]["student_accuracy"],
        "student_params": student.params,
        "teacher_accuracy_mean": float(np.mean(teacher_acc)) if teacher_acc else None,
        "teacher_params": teachers,
        "largest_teacher_params": max(teachers.values()),
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in run.rounds),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in run.rounds),
        "wall_s": round(sum(r["wall_s"] for r in run.rounds), 3),
        "title": f"{cfg.scenario}: {cfg.num_clients} clients, {cfg.partitioner}",
    })


def student_meta(cfg: RunConfig, num_classes: int, image_size: tuple[int, ...], round_: int) -> dict:
    return {
        "model": cfg.student_model, "num_classes": num_classes, "image_size": list(image_size),
        "temperature": cfg.temperature, "round": round_, "dataset": cfg.dataset, "scenario": cfg.scenario,
    }
