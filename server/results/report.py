"""The run's human report, `report.md`: everything results.json says, as tables, with the plots.

Written when a run ends (completed, failed, or stopped with `flwr stop`) and again whenever a later command adds a
section to the run folder's results.json (server/results/run_folder.py `add_section`): `fedstill evaluate`
(`evaluation`), `fedstill export` (`export`), `fedstill bench` (`serving`). The rounds, final figures, audit and
privacy sections are read through their typed records (server/results/schema.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.audit.naming import CLAIM
from common.files import PRIVATE, atomic_write_text
from server.results.phases import NOTE, phase_lines
from server.results.schema import STUDENT_METRICS, AuditSummary, FinalFigures, PrivacySummary, RoundRow, ServingSummary

REPORT = "report.md"


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    path = run_dir / REPORT
    atomic_write_text(path, render(results, run_dir), mode=PRIVATE)
    return path


def render(r: dict[str, Any], run_dir: Path) -> str:
    cfg = r.get("scenario", {})
    rounds = [RoundRow.from_json(row) for row in r.get("rounds", [])]
    final = FinalFigures.from_json(r["final"]) if r.get("final") else None
    lines = [f"# Run {run_dir.name}: {(final.title if final else '') or cfg.get('scenario', '')}", "",
             f"Status: **{r.get('status', 'unknown')}**" + (f" ({r['error']})" if r.get("error") else "") +
             f"; {len(rounds)} of {cfg.get('num-server-rounds', '?')} rounds recorded. "
             f"Method {cfg.get('method')}, aggregation {cfg.get('aggregation')}, student {cfg.get('student-model')}, "
             f"teachers {cfg.get('teacher-models')}, codec {cfg.get('codec')}, privacy {cfg.get('privacy', 'none')}.", ""]
    if final:
        lines += _headline(final)
    lines += _rounds(rounds)
    lines += _time(rounds)
    lines += _institutions(rounds, AuditSummary.from_json(r["audit"]).institutions if r.get("audit") else {})
    if r.get("privacy"):
        lines += _privacy(PrivacySummary.from_json(r["privacy"]))
    if r.get("audit"):
        lines += _audit(AuditSummary.from_json(r["audit"]))
    for name, part in (("evaluation", _evaluation), ("export", _export), ("serving", _serving)):
        if r.get(name):
            lines += part(r[name])
    if (run_dir / "accuracy.png").is_file():
        lines += ["![accuracy per round](accuracy.png)", ""]
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(map(str, row))} |" for row in rows), ""]


def _num(value: Any, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def _count(value: Any) -> str:
    return "–" if value is None else f"{value:,}"


def _headline(f: FinalFigures) -> list[str]:
    rows = [("student accuracy (test)", _num(f.student_accuracy))]
    rows += [(f"student {name.replace('_', ' ')}", _num(value)) for name in STUDENT_METRICS
             if isinstance(value := getattr(f, f"student_{name}"), float)]
    rows += [("student parameters", _count(f.student_params)),
             ("teachers' accuracy mean / min / max",
              " / ".join(_num(v) for v in (f.teacher_accuracy_mean, f.teacher_accuracy_min, f.teacher_accuracy_max))),
             ("largest teacher parameters", _count(f.largest_teacher_params)),  # none in a FedAvg run
             ("uplink bytes, all rounds", _count(f.uplink_bytes_total)),
             ("downlink bytes, all rounds", _count(f.downlink_bytes_total)),
             ("round time, all rounds (s)", _num(f.wall_s, ".1f"))]
    if f.server_peak_rss_bytes is not None:
        rows.append(("server peak memory (RSS, MiB)", _num(f.server_peak_rss_bytes / 2**20, ",.0f")))
    return ["## Headline", "", *_table(("figure", "value"), rows)]


def _time(rounds: list[RoundRow]) -> list[str]:
    """Where a round's time went (server/results/phases.py), when the rounds were profiled."""
    lines = phase_lines(rounds)
    if not lines:
        return []
    rows = [(line.where, line.label, _num(line.mean_s, ".3f"), _num(None if line.share is None else 100 * line.share, ".1f"))
            for line in lines]
    return ["## Where the time went", "", NOTE, "", *_table(("where", "phase", "mean s", "% of round"), rows)]


def _rounds(rounds: list[RoundRow]) -> list[str]:
    if not rounds:
        return []
    rows = [(x.round, _num(x.temperature, "g"), _num(x.student_accuracy), _num(x.ensemble_accuracy), x.clients_replied,
             _rejected(x), f"{x.uplink_bytes:,}", _num(x.wall_s, ".1f")) for x in rounds]
    return ["## Rounds", "", *_table(("round", "T", "student acc", "ensemble acc (public)", "replies", "rejected",
                                      "uplink bytes", "wall s"), rows)]


def _rejected(row: RoundRow) -> str:
    """How many replies the round dropped, and whose, by institution where the row knows it."""
    names = [_label(node, row) for node in sorted(row.clients_rejected)]
    return f"{len(names)} ({', '.join(names)})" if names and (row.institutions or row.institutions_claimed) else str(len(names))


def _label(node: str, row: RoundRow) -> str:
    """A node id as people read it: its institution (checked, or marked claimed), else the node id."""
    if node in (row.institutions or {}):
        return (row.institutions or {})[node]
    if node in (row.institutions_claimed or {}):
        return f"{(row.institutions_claimed or {})[node]} (claimed)"
    return f"node {node}"


def _institutions(rounds: list[RoundRow], audit: dict[str, str]) -> list[str]:
    """Each node of the run by institution: rounds it answered, bytes it sent, replies dropped, its teacher."""
    nodes = sorted({n for x in rounds for n in (*x.uplink_bytes_per_client, *x.clients_rejected)}, key=lambda n: (len(n), n))
    if not nodes or not (audit or any(x.institutions or x.institutions_claimed for x in rounds)):
        return []
    rows = []
    for node in nodes:
        name = audit.get(node) or next((_label(node, x) for x in reversed(rounds) if _label(node, x) != f"node {node}"),
                                       "unidentified")
        teacher = next((x.teacher_accuracy[node] for x in reversed(rounds) if x.teacher_accuracy and node in x.teacher_accuracy), None)
        rows.append((name, node, sum(1 for x in rounds if node in x.uplink_bytes_per_client and node not in x.clients_rejected),
                     f"{sum(x.uplink_bytes_per_client.get(node, 0) for x in rounds):,}",
                     sum(1 for x in rounds if node in x.clients_rejected), _num(teacher)))
    return ["## Institutions", "", *_table(("institution", "node", "rounds answered", "uplink bytes", "replies dropped",
                                            "teacher acc (last)"), sorted(rows))]


def _privacy(p: PrivacySummary) -> list[str]:
    if p.mechanism == "none":
        summary = "**No formal privacy guarantee**: the run used no privacy mechanism (privacy \"none\"), so no epsilon is claimed"
    else:
        summary = f"Mechanism {p.mechanism}, delta {p.delta}"
    lines = ["## Privacy", "", f"{summary}, secure aggregation {'on' if p.secure_aggregation else 'off'}; "
             f"{_refusals(p.refusals)}.", ""]
    if p.epsilon_final:
        lines += _table(("institution", "epsilon spent"), [(name, _num(value)) for name, value in sorted(p.epsilon_final.items())])
    if p.refusals:
        lines += ["", *_table(("round", "institution", "check", "reason"), [
            (r.get("round"), _refuser(r), r.get("check", "privacy-budget"),
             str(r.get("reason", "")).replace("|", "/")) for r in p.refusals])]
    return lines


def _refuser(refusal: dict[str, Any]) -> str:
    name = refusal.get("institution_id")
    if not name:
        return str(refusal.get("node_id"))
    return f"{name} (claimed)" if refusal.get("institution_from") == CLAIM else str(name)


def _refusals(refusals: list[dict[str, Any]]) -> str:
    budget = sum(r.get("check", "privacy-budget") == "privacy-budget" for r in refusals)
    return f"{budget} budget refusal(s), {len(refusals) - budget} site-policy refusal(s)"


def _audit(a: AuditSummary) -> list[str]:
    return ["## Audit", "", f"Ledger {a.ledger}: {a.ledger_entries} entries, head {a.ledger_head}, "
            f"signatures checked: {a.signatures_checked}, rejected replies: {a.rejections}. "
            f"`fedstill audit verify` re-checks it.", ""]


def _evaluation(e: dict[str, Any]) -> list[str]:
    ret, size = e.get("retention") or {}, e.get("size") or {}
    rows = [("accuracy", _num(e.get("accuracy"))), ("macro-F1", _num(e.get("macro_f1"))),
            (f"ECE ({e.get('ece_bins')} bins)", _num(e.get("ece")))]
    if ret.get("source"):
        rows += [("JS divergence to the teacher ensemble (bits, T = 1)", _num(ret.get("js_divergence_bits"))),
                 ("top-1 agreement with the ensemble", _num(ret.get("top1_agreement")))]
    rows += [("parameters", f"{size.get('params', 0):,}"), ("student.safetensors bytes", f"{size.get('safetensors_bytes', 0):,}")]
    lines = ["## Evaluation", "", *_table(("figure", "value"), rows)]
    if ret.get("source"):
        lines += [f"Teacher ensemble: {ret['source']}.", ""]
    for curve in (e.get("robustness") or {}).get("curves", {}).values():
        lines += [f"- {curve['title']}: " + ", ".join(f"{p['level']:g} → {p['accuracy']:.4f}" for p in curve["points"])]
    return lines + ["", "Details: [evaluation/evaluation.md](evaluation/evaluation.md).",
                    "![robustness](evaluation/robustness.png)", ""]


def _export(x: dict[str, Any]) -> list[str]:
    parity, int8, acc = x.get("parity_fp32", {}), x.get("int8", {}), x.get("accuracy", {})
    rows = [("ONNX opset", x.get("opset")),
            ("FP32 vs PyTorch: largest probability difference", _num(parity.get("max_abs_prob_diff"), ".2e")),
            ("FP32 vs PyTorch: argmax agreement", _num(parity.get("argmax_agreement"))),
            ("accuracy PyTorch / ONNX FP32 / INT8", " / ".join(_num(acc.get(k)) for k in ("pytorch", "onnx_fp32", "onnx_int8"))),
            (f"INT8 ({int8.get('mode')}, {int8.get('format')}) drop", f"{_num(int8.get('accuracy_drop_points'), '.2f')} points")]
    rows += [(name, f"{entry['bytes']:,} bytes") for name, entry in x.get("files", {}).items()]
    choice = x.get("recommendation")
    return ["## Export", "", *_table(("figure", "value"), rows),
            *([f"Ship **{str(choice.get('precision')).upper()}**: {choice.get('reason')}.", ""] if choice else [])]


def _serving(raw: dict[str, Any]) -> list[str]:
    s = ServingSummary.from_json(raw)
    rows = [(engine, batch, f"{row['throughput']:,.0f}", f"{row['throughput_x_teacher']:.2f}", f"{row['p50_ms']:.3f}",
             f"{row['p95_ms']:.3f}") for engine, by_batch in s.engines.items() for batch, row in by_batch.items()]
    lines = ["## Serving", "", f"{s.threads} intra-op thread(s); teacher {s.teacher.get('model')}, "
             f"student {s.student.get('model')}; x teacher: against the teacher in PyTorch.", "",
             *_table(("engine", "batch", "samples/s", "x teacher", "p50 ms", "p95 ms"), rows)]
    if s.per_engine:
        like = [(engine, batch, f"{row['student_throughput']:,.0f}", f"{row['teacher_throughput']:,.0f}",
                 f"{row['student_x_teacher']:.2f}") for engine, by_batch in s.per_engine.items() for batch, row in by_batch.items()]
        lines += ["Student against teacher in the same engine:", "",
                  *_table(("engine", "batch", "student samples/s", "teacher samples/s", "student x teacher"), like)]
    if s.int8:
        lines += [f"Ship **{str(s.int8.get('precision')).upper()}**: {s.int8.get('reason')}.", ""]
    return lines
