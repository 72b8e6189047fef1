"""What a run records, built from what a round produced: the row of results.json for each round, the final
figures, and the student's metadata (student.json and the safetensors header), as the typed records of
server/results/schema.py. Distillation and FedAvg share `final_figures`, `student_meta` and `run_title`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.audit.attestation import claimed_institution
from common.audit.naming import refusing_institution
from common.config import RunConfig
from common.messages import DigestReply, MaskedReply, SoftLabelQuery, SoftLabelReply
from server.exchange import Exchange
from server.results.schema import FinalFigures, RoundRow, StudentMeta
from server.rounds import SoftLabels


def round_row(query: SoftLabelQuery, replies: SoftLabels, metrics: Mapping[str, float], ensemble_acc: float,
              student_loss: float, distilled_samples: int, digest: Exchange[DigestReply] | None, wall_s: float,
              names: Mapping[str, str] | None = None) -> RoundRow:
    """One distillation round: the replies (accepted, rejected, bytes each way), the student's test `metrics`
    (accuracy and common.metrics), the FedMD `digest` step's outcome when the round had one, and each node's
    institution: checked (`names`, the audit trail's node -> institution) or only claimed (institution_names)."""
    accepted: list[tuple[int, SoftLabelReply | MaskedReply]] = sorted(replies.accepted.items())
    accuracy, others = split_metrics(metrics)
    checked, claimed = institution_names(replies, names or {})
    return RoundRow(
        round=query.round,
        temperature=query.temperature,
        student_accuracy=accuracy,
        ensemble_accuracy=ensemble_acc,
        clients_replied=len(accepted),
        clients_rejected={str(n): reason for n, reason in sorted(replies.rejected.items())},
        uplink_bytes=sum(replies.uplink_bytes.values()),
        uplink_bytes_per_client={str(n): b for n, b in sorted(replies.uplink_bytes.items())},
        downlink_bytes=replies.downlink_bytes + (digest.downlink_bytes if digest is not None else 0),
        teacher_rounds={str(n): r.teacher_rounds for n, r in accepted},
        teacher_accuracy={str(n): r.teacher_accuracy for n, r in accepted if r.teacher_accuracy >= 0},
        teacher_params={str(n): r.teacher_params for n, r in accepted},
        student_loss=student_loss,
        distilled_samples=distilled_samples,
        student_metrics=others,
        digest_failed=None if digest is None else {str(n): reason for n, reason in sorted(digest.rejected.items())},
        wall_s=wall_s,
        institutions=checked,
        institutions_claimed=claimed,
    )


def institution_names(replies: Exchange[Any], names: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(checked, claimed) node id -> institution for every node of an exchange: checked when `names` (the nodes
    whose signatures the audit trail checked against the allow-list) holds it; else claimed, by the attestation
    the reply carried (unchecked: rejected, or a run without an allow-list) or by a refusal's own words."""
    nodes = sorted({*replies.accepted, *replies.rejected, *replies.uplink_bytes})
    checked = {str(n): names[str(n)] for n in nodes if str(n) in names}
    claimed = {}
    for node in (n for n in nodes if str(n) not in checked):
        name = claimed_institution(replies.attestations.get(node)) or refusing_institution(replies.rejected.get(node))
        if name:
            claimed[str(node)] = name
    return checked, claimed


def split_metrics(metrics: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """The student's test accuracy, and its other metrics (balanced accuracy, macro-F1, AUROC) by name."""
    return metrics["accuracy"], {name: value for name, value in metrics.items() if name != "accuracy"}


def final_figures(rows: Sequence[RoundRow], student_params: int, title: str,
                  server_peak_rss_bytes: int | None = None) -> FinalFigures:
    """The headline figures: the last round's student and teachers (None in a FedAvg run), totals of all rounds,
    and the ServerApp's peak memory (server.profile.peak_rss_bytes)."""
    last = rows[-1]
    teachers = None if last.teacher_params is None else dict(last.teacher_params)  # the last round's institutions
    teacher_acc = list((last.teacher_accuracy or {}).values())
    metrics = last.student_metrics or {}
    return FinalFigures(
        student_accuracy=last.student_accuracy,
        student_balanced_accuracy=metrics.get("balanced_accuracy"),
        student_macro_f1=metrics.get("macro_f1"),
        student_auroc=metrics.get("auroc"),
        student_params=student_params,
        teacher_accuracy_mean=float(np.mean(teacher_acc)) if teacher_acc else None,
        teacher_accuracy_min=float(np.min(teacher_acc)) if teacher_acc else None,
        teacher_accuracy_max=float(np.max(teacher_acc)) if teacher_acc else None,
        teacher_params=teachers,
        largest_teacher_params=max(teachers.values()) if teachers else None,
        uplink_bytes_total=sum(r.uplink_bytes for r in rows),
        downlink_bytes_total=sum(r.downlink_bytes for r in rows),
        wall_s=round(sum(r.wall_s for r in rows), 3),
        title=title,
        server_peak_rss_bytes=server_peak_rss_bytes,
    )


def run_title(cfg: RunConfig) -> str:
    """The run's title in report.md and on its plot."""
    if cfg.method == "fedavg":
        return f"{cfg.scenario}: FedAvg, {cfg.num_clients} clients"
    return f"{cfg.scenario}: {cfg.num_clients} clients, {cfg.partitioner}, {cfg.aggregation}"


def student_meta(cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...], round_: int) -> StudentMeta:
    """student.json of the student after round `round_` (the temperature only where it distilled)."""
    return StudentMeta(
        model=cfg.student_model, num_classes=num_classes, input_shape=tuple(input_shape),
        temperature=None if cfg.method == "fedavg" else cfg.temperature, round=round_, method=cfg.method,
        dataset=cfg.dataset, scenario=cfg.scenario,
    )
