"""The compliance report as files: audit-report.json, a Markdown page for a compliance officer, and its plots."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.files import atomic_path, atomic_write_text

JSON_FILE, MARKDOWN_FILE = "audit-report.json", "audit-report.md"
BYTES_PLOT, EPSILON_PLOT = "audit-bytes-per-round.png", "audit-epsilon.png"


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write audit-report.json, audit-report.md and its two plots into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / JSON_FILE, out_dir / MARKDOWN_FILE, out_dir / BYTES_PLOT, out_dir / EPSILON_PLOT]
        for path, text in zip(paths[:2], (json.dumps(report, indent=2) + "\n", render_markdown(report)), strict=True):
            atomic_write_text(path, text)
        _plot_bytes(report, paths[2])
        _plot_epsilon(report, paths[3])
    except OSError as error:
        raise ConfigError(f"cannot write the report into {out_dir}: {error.strerror or error}; choose another --out") from None
    return paths


def render_markdown(report: dict[str, Any]) -> str:
    """A page for a compliance officer: verification first, then runs, institutions, rejections, privacy, logs, plots."""
    return "\n".join([_md_verification(report), _md_runs(report), _md_institutions(report), _md_rejections(report),
                      _md_privacy(report), _md_release_logs(report),
                      f"## Plots\n\n![bytes released per round]({BYTES_PLOT})\n\n![cumulative epsilon]({EPSILON_PLOT})\n"])


def _md_verification(report: dict[str, Any]) -> str:
    failed, ledgers = [ledger for ledger in report["ledgers"] if not ledger["ok"]], report["ledgers"]
    status = (f"**NOT VERIFIED**: {len(failed)} of {len(ledgers)} ledger(s) failed verification. The figures below still include "
              f"what could be read from them, marked *(unverified)*; they cannot be trusted as they stand." if failed else
              "**VERIFIED**: every signature, hash link and sequence number holds" + (
                  ", and the release logs given match the ledgers." if report["release_logs"] else
                  "; no institution's release log was given to cross-check."))
    findings = "\n".join(f"\n{title} of `{ledger['path']}`:\n\n" + "\n".join(f"- {_cell(item)}" for item in ledger[kind])
                         for ledger in ledgers for kind, title in (("problems", "Problems"), ("notes", "Notes")) if ledger[kind])
    return (f"# Audit report\n\nGenerated {report['generated']} from {len(ledgers)} ledger(s) and {len(report['release_logs'])} "
            f"release log(s).\n\n" + _section("Verification", ["ledger", "run", "status", "entries", "release logs"], [
                [f"`{ledger['path']}`", ledger["run"], "verified" if ledger["ok"] else f"**FAILED** ({len(ledger['problems'])} problem(s))",
                 ledger["checked"].get(Path(ledger["path"]).name, 0), len(ledger["release_logs"])] for ledger in ledgers],
                intro=status, note=findings))


def _md_runs(report: dict[str, Any]) -> str:
    return _section("Runs", ["run", "run id(s)", "scenario", "method", "aggregation", "rounds", "status", "student sha256"], [
        [run["run"] + ("" if run["verified"] else " *(unverified)*"), ", ".join(run["run_ids"]), run["scenario"], run["method"],
         run["aggregation"], f"{run['rounds']} of {run['num_server_rounds']}",
         f"{run['status']}" + (f": {run['error']}" if run["error"] else "")
         + "".join(f" (resumed after round {r['after_round']}, round(s) {r['abandoned_rounds']} abandoned and run again)"
                   for r in run.get("resumes", [])),
         f"`{run['student_sha256']}`" if run["student_sha256"] else ""] for run in report["runs"]])


def _md_institutions(report: dict[str, Any]) -> str:
    rows = []
    for name, inst in report["institutions"].items():
        logs = [log for log in report["release_logs"] if log["institution"] == name]
        missing = sum(len(log["missing"]) for log in logs)
        late = f" ({inst['releases_only_logged'] - missing} late or abandoned)" if inst["releases_only_logged"] > missing else ""
        logged = (f"{sum(log['releases'] for log in logs)} logged, " + (f"**{missing} missing from the ledger**" if missing else
                  "all in the ledger") + late) if logs else "not given"
        rounds = "; ".join(f"{run}: {', '.join(map(str, r)) if len(r) <= 8 else f'{len(r)} rounds, {r[0]}-{r[-1]}'}"
                           for run, r in inst["rounds"].items())
        unverified = f" *(unverified: {', '.join(inst['unverified_runs'])})*" if inst["unverified_runs"] else ""
        rows.append([name + unverified, len(inst["runs"]), rounds, inst["releases_accepted"], inst["releases_rejected"],
                     f"{inst['bytes_accepted']:,}", f"{inst['bytes_sent']:,}", "; ".join(inst["data_categories"]),
                     inst["first_release"], inst["last_release"], logged])
    return _section("Institutions", ["institution", "runs", "rounds joined", "accepted", "rejected", "bytes accepted", "bytes sent",
                                     "data categories", "first release", "last release", "release log"], rows,
                    note="*Bytes sent* counts every attested release: accepted, rejected, and those only the release log holds "
                         "(late, made for a round abandoned when the coordinator stopped, or missing from the ledger).")


def _md_rejections(report: dict[str, Any]) -> str:
    order = {run["run"]: n for n, run in enumerate(report["runs"])}
    rows = sorted(([r["run"], r["round"], r["phase"], name, r["node_id"], r["check"], r["reason"], r["time"]]
                   for name, inst in report["institutions"].items() for r in inst["rejections"]),
                  key=lambda row: (order[row[0]], str(row[7])))
    return _section("Rejections", ["run", "round", "phase", "institution", "node", "check", "reason", "time"], rows,
                    empty="No reply was rejected.")


def _md_privacy(report: dict[str, Any]) -> str:
    note = ("The sums are basic composition over every attested release (accepted, rejected or only logged: all left the "
            "institution), an upper bound; *epsilon_total* is the institution's own accounting. "
            "Per-release figures are in the JSON report.")
    if any(inst["privacy_summary"]["no_guarantee"] for inst in report["institutions"].values()):
        note += ("\n\n**Mechanism `none`**: epsilon 0 is recorded for releases made without a privacy mechanism; it means no "
                 "differential-privacy guarantee was claimed, not perfect privacy.")
    return _section("Privacy", ["institution", "mechanism(s)", "attested releases", "epsilon per release (max)",
                                "epsilon, sum over releases", "epsilon_total reported (max)", "delta, sum"], [
        [name, ", ".join(inst["privacy_mechanisms"]) or "none", s["releases"], f"{s['epsilon_max']:g}", f"{s['epsilon_sum']:g}",
         f"{s['epsilon_total_reported_max']:g}", f"{s['delta_sum']:g}"]
        for name, inst in report["institutions"].items() for s in [inst["privacy_summary"]]], note=note)


def _md_release_logs(report: dict[str, Any]) -> str:
    return _section("Release logs", ["log", "institution", "releases", "accepted", "rejected", "late (timed out)",
                                     "abandoned (coordinator stopped)", "missing from the ledger", "of other runs",
                                     "all in the ledger", "checked against"], [
        [f"`{log['path']}`", log["institution"], log["releases"], log["accepted"], log["rejected"], log["late"],
         log.get("abandoned", 0),
         "; ".join(f"{m['run']} round {m['round']}" for m in log["missing"]) or "0", log["other_runs"],
         "yes" if log["all_in_ledger"] else "**no**", ", ".join(log["checked_against"]) or "**not checked**"]
        for log in report["release_logs"]], empty="No institution's release log was given: the ledgers were not cross-checked.")


def _section(title: str, headers: list[str], rows: list[list[Any]], empty: str = "", intro: str = "", note: str = "") -> str:
    """A `## title` with an optional intro, a table (or `empty` when there are no rows) and an optional note."""
    if not rows and empty:
        return f"## {title}\n\n{empty}\n"
    lines = [f"## {title}\n", *([intro, ""] if intro else []), "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell("" if value is None else value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n" + (f"\n{note.strip(chr(10))}\n" if note else "")


def _cell(value: Any) -> str:
    """Text made safe for one Markdown table cell: no row breaks, no column breaks."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _plot_bytes(report: dict[str, Any], path: Path) -> None:
    """Bytes each institution sent per round; releases the coordinator did not accept crossed in red."""
    plt, fig, ax, index, ticks = _figure(report)
    crossed: list[tuple[int, int]] = []
    for name, inst in report["institutions"].items():
        totals: dict[int, int] = {}
        for item in inst["per_round"]:
            if (x := index.get((item["run"], item["round"]))) is not None:
                totals[x] = totals.get(x, 0) + item["bytes"]
        xs = sorted(totals)
        ax.plot(xs, [totals[x] for x in xs], marker="o", markersize=4, label=name)
        refused = {index.get((item["run"], item["round"])) for item in inst["per_round"] if item["outcome"] != "accepted"}
        crossed += [(x, totals[x]) for x in xs if x in refused]
    if crossed:
        ax.scatter(*zip(*crossed, strict=True), marker="x", s=70, color="red", zorder=3, label="not accepted by the coordinator")
    ax.set(xlabel="round", ylabel="bytes sent", title="bytes released per round, per institution", ylim=(0, None))
    _save(fig, ax, ticks, path, plt)


def _plot_epsilon(report: dict[str, Any], path: Path) -> None:
    """Cumulative epsilon per institution (basic composition over attested releases)."""
    plt, fig, ax, index, ticks = _figure(report)
    for name, inst in report["institutions"].items():
        points = sorted((index[(p["run"], p["round"])], p["epsilon"]) for p in inst["privacy"] if (p["run"], p["round"]) in index)
        xs = [x for x, _ in points]
        ax.step(xs, list(itertools.accumulate(epsilon for _, epsilon in points)), where="post", marker="o", markersize=4, label=name)
    if all(inst["privacy_summary"]["no_guarantee"] for inst in report["institutions"].values()):
        ax.annotate("mechanism 'none': epsilon 0 means no guarantee was claimed", xy=(0.02, 0.95), xycoords="axes fraction",
                    fontsize=8, va="top", color="darkred")
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="privacy spent per institution (sum of epsilon)", ylim=(0, None))
    _save(fig, ax, ticks, path, plt)


def _figure(report: dict[str, Any]) -> tuple[Any, Any, Any, dict[tuple[str, Any], int], list[str]]:
    """A figure whose x axis is every round of every run in ledger order: (run, round) -> x, and tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(run, round_) for run, round_ in report["rounds_axis"]]
    one_run = len({run for run, _ in points}) <= 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    return plt, fig, ax, {point: x for x, point in enumerate(points)}, [str(r) if one_run else f"{run}:{r}" for run, r in points]


def _save(fig: Any, ax: Any, ticks: list[str], path: Path, plt: Any) -> None:
    if ticks:
        step, long = max(1, -(-len(ticks) // 20)), len(ticks[0]) >= 6  # at most about 20 labels
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], rotation=30 if long else 0, ha="right" if long else "center")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
