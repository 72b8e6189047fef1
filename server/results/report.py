"""The run's human report, `report.md`: everything results.json says, as tables, with the plots.

Written when a run ends (completed or failed) and again whenever a later command adds to the run folder:
`fedstill evaluate` (the `evaluation` section of results.json), `fedstill export` (`export`), `fedstill bench`
(`serving`). `add_section` is the one way those commands write into results.json: read, add, write atomically,
then re-render the report, so the two never disagree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import ConfigError

RESULTS, REPORT = "results.json", "report.md"


def add_section(run_dir: Path, name: str, section: dict[str, Any]) -> dict[str, Any]:
    """Put `section` into the run's results.json under `name` (replacing an older one) and re-render report.md."""
    from server.results.run_folder import write_json

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


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    path = run_dir / REPORT
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(results, run_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path


def render(r: dict[str, Any], run_dir: Path) -> str:
    cfg, final = r.get("scenario", {}), r.get("final") or {}
    lines = [f"# Run {run_dir.name}: {final.get('title') or cfg.get('scenario', '')}", "",
             f"Status: **{r.get('status', 'unknown')}**" + (f" ({r['error']})" if r.get("error") else "") +
             f"; {len(r.get('rounds', []))} of {cfg.get('num-server-rounds', '?')} rounds recorded. "
             f"Method {cfg.get('method')}, aggregation {cfg.get('aggregation')}, student {cfg.get('student-model')}, "
             f"teachers {cfg.get('teacher-models')}, codec {cfg.get('codec')}, privacy {cfg.get('privacy', 'none')}.", ""]
    if final:
        lines += _headline(final)
    lines += _rounds(r.get("rounds", []))
    for name, part in (("privacy", _privacy), ("audit", _audit), ("evaluation", _evaluation),
                       ("export", _export), ("serving", _serving)):
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


def _headline(f: dict[str, Any]) -> list[str]:
    rows = [("student accuracy (test)", _num(f.get("student_accuracy")))]
    rows += [(f"student {key[len('student_'):].replace('_', ' ')}", _num(value)) for key, value in f.items()
             if key.startswith("student_") and key not in ("student_accuracy", "student_params") and isinstance(value, float)]
    rows += [("student parameters", _count(f.get("student_params"))),
             ("teachers' accuracy mean / min / max", " / ".join(_num(f.get(f"teacher_accuracy_{k}")) for k in ("mean", "min", "max"))),
             ("largest teacher parameters", _count(f.get("largest_teacher_params"))),  # none in a FedAvg run
             ("uplink bytes, all rounds", _count(f.get("uplink_bytes_total"))),
             ("downlink bytes, all rounds", _count(f.get("downlink_bytes_total"))),
             ("round time, all rounds (s)", _num(f.get("wall_s"), ".1f"))]
    return ["## Headline", "", *_table(("figure", "value"), rows)]


def _rounds(rounds: list[dict[str, Any]]) -> list[str]:
    if not rounds:
        return []
    rows = [(x["round"], _num(x.get("temperature"), "g"), _num(x.get("student_accuracy")), _num(x.get("ensemble_accuracy")),
             x.get("clients_replied", "–"), len(x.get("clients_rejected") or {}), f"{x.get('uplink_bytes', 0):,}",
             _num(x.get("wall_s"), ".1f")) for x in rounds]
    return ["## Rounds", "", *_table(("round", "T", "student acc", "ensemble acc (public)", "replies", "rejected",
                                      "uplink bytes", "wall s"), rows)]


def _privacy(p: dict[str, Any]) -> list[str]:
    eps = p.get("epsilon_final") or {}
    lines = ["## Privacy", "", f"Mechanism {p.get('mechanism')}, delta {p.get('delta')}, secure aggregation "
             f"{'on' if p.get('secure_aggregation') else 'off'}; {len(p.get('refusals') or [])} budget refusal(s).", ""]
    if eps:
        lines += _table(("institution", "epsilon spent"), [(name, _num(value)) for name, value in sorted(eps.items())])
    return lines


def _audit(a: dict[str, Any]) -> list[str]:
    return ["## Audit", "", f"Ledger {a.get('ledger')}: {a.get('ledger_entries')} entries, head {a.get('ledger_head')}, "
            f"signatures checked: {a.get('signatures_checked')}, rejected replies: {a.get('rejections')}. "
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
    rows = [("ONNX opset", x.get("opset")), ("FP32 vs PyTorch: largest probability difference", _num(parity.get("max_abs_prob_diff"), ".2e")),
            ("FP32 vs PyTorch: argmax agreement", _num(parity.get("argmax_agreement"))),
            ("accuracy PyTorch / ONNX FP32 / INT8", " / ".join(_num(acc.get(k)) for k in ("pytorch", "onnx_fp32", "onnx_int8"))),
            (f"INT8 ({int8.get('mode')}, {int8.get('format')}) drop", f"{_num(int8.get('accuracy_drop_points'), '.2f')} points")]
    rows += [(name, f"{entry['bytes']:,} bytes") for name, entry in x.get("files", {}).items()]
    return ["## Export", "", *_table(("figure", "value"), rows)]


def _serving(s: dict[str, Any]) -> list[str]:
    rows = [(engine, batch, f"{row['throughput']:,.0f}", f"{row['throughput_x_teacher']:.2f}", f"{row['p50_ms']:.3f}",
             f"{row['p95_ms']:.3f}") for engine, by_batch in s.get("engines", {}).items() for batch, row in by_batch.items()]
    return ["## Serving", "", f"{s.get('threads')} intra-op thread(s); teacher {s.get('teacher', {}).get('model')}, "
            f"student {s.get('student', {}).get('model')}.", "",
            *_table(("engine", "batch", "samples/s", "x teacher", "p50 ms", "p95 ms"), rows)]
