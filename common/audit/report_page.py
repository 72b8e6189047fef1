"""The compliance report as files: audit-report.json, a Markdown page and a self-contained HTML page (common.audit.
report_html) for a compliance officer, and its plots."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

from common.audit.report_html import COMPOSITION_CHART, render_html
from common.audit.report_privacy import NO_GUARANTEE
from common.errors import ConfigError
from common.files import PRIVATE, atomic_write_bytes, atomic_write_text, private_folder

JSON_FILE, MARKDOWN_FILE, HTML_FILE = "audit-report.json", "audit-report.md", "audit-report.html"
BYTES_PLOT, EPSILON_PLOT = "audit-bytes-per-round.png", "audit-epsilon.png"


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write audit-report.json, audit-report.md, audit-report.html (its charts inside) and the two plots into
    `out_dir`, each atomically and owner-only (0600; `out_dir` made 0700 when missing)."""
    out_dir = Path(out_dir)
    try:
        private_folder(out_dir)
        charts = {BYTES_PLOT: _plot_bytes(report), EPSILON_PLOT: _plot_epsilon(report)}
        if any(inst.get("privacy_ledger") for inst in report["institutions"].values()):
            charts[COMPOSITION_CHART] = _plot_composition(report)
        paths = [out_dir / JSON_FILE, out_dir / MARKDOWN_FILE, out_dir / HTML_FILE, out_dir / BYTES_PLOT, out_dir / EPSILON_PLOT]
        for path, text in zip(paths[:3], (json.dumps(report, indent=2) + "\n", render_markdown(report),
                                          render_html(report, charts)), strict=True):
            atomic_write_text(path, text, mode=PRIVATE)
        for path in paths[3:]:
            atomic_write_bytes(path, charts[path.name], mode=PRIVATE)
    except OSError as error:
        raise ConfigError(f"cannot write the report into {out_dir}: {error.strerror or error}; choose another --out") from None
    return paths


def render_markdown(report: dict[str, Any]) -> str:
    """A page for a compliance officer: verification first, then runs, institutions, rejections, privacy, logs, plots."""
    return "\n".join([_md_verification(report), _md_runs(report), _md_institutions(report), _md_rejections(report),
                      _md_privacy(report), _md_privacy_ledgers(report), _md_release_logs(report),
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
    return _section("Runs", ["run", "run id(s)", "scenario", "method", "aggregation", "privacy", "rounds", "status",
                             "student sha256"], [
        [run["run"] + ("" if run["verified"] else " *(unverified)*"), ", ".join(run["run_ids"]), run["scenario"], run["method"],
         run["aggregation"], _run_privacy(run), f"{run['rounds']} of {run['num_server_rounds']}",
         f"{run['status']}" + (f": {run['error']}" if run["error"] else "")
         + "".join(f" (resumed after round {r['after_round']}, round(s) {r['abandoned_rounds']} abandoned and run again)"
                   for r in run.get("resumes", [])),
         f"`{run['student_sha256']}`" if run["student_sha256"] else ""] for run in report["runs"]])


def _run_privacy(run: dict[str, Any]) -> str:
    """A run's mechanism, or "no formal privacy guarantee" (never epsilon 0) when it had none."""
    privacy = run.get("privacy")
    return "" if privacy is None else NO_GUARANTEE if run.get("guarantee") == "none" else str(privacy)


def _witnessed(inst: dict[str, Any]) -> str:
    """How many signed tree heads the institution cosigned, and the largest; "none" when it cosigned none."""
    witnessed = inst.get("witnessed") or {}
    if not witnessed.get("cosignatures"):
        return "none"
    return f"{witnessed['cosignatures']} (largest tree {witnessed['largest_size']} entries)"


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
                     inst["first_release"], inst["last_release"], logged, inst.get("refusals", 0), _witnessed(inst)])
    return _section("Institutions", ["institution", "runs", "rounds joined", "accepted", "rejected", "bytes accepted", "bytes sent",
                                     "data categories", "first release", "last release", "release log",
                                     "of the rejected: refused by the institution", "witnessed checkpoints"], rows,
                    note="*Bytes sent* counts every attested release: accepted, rejected, and those only the release log holds "
                         "(late, made for a round abandoned when the coordinator stopped, or missing from the ledger).")


def _md_rejections(report: dict[str, Any]) -> str:
    order = {run["run"]: n for n, run in enumerate(report["runs"])}
    rows = sorted(([r["run"], r["round"], r["phase"], name + (" (claimed)" if r.get("institution_from") == "claim" else ""),
                    r["node_id"], r["check"], r["reason"], r["time"]]
                   for name, inst in report["institutions"].items() for r in inst["rejections"]),
                  key=lambda row: (order[row[0]], str(row[7])))
    return _section("Rejections", ["run", "round", "phase", "institution", "node", "check", "reason", "time"], rows,
                    empty="No reply was rejected.")


def _md_privacy(report: dict[str, Any]) -> str:
    note = ("The sums are over every attested release under a mechanism (accepted, rejected or only logged: all left the "
            "institution); each release's epsilon is what the institution's own accountant added to its total, and "
            "*epsilon_total* is that total. Per-release figures are in the JSON report.")
    if any(inst["privacy_summary"]["runs_without_guarantee"] for inst in report["institutions"].values()):
        note += (f"\n\n**{NO_GUARANTEE.capitalize()}**: releases made without a privacy mechanism (`none`) carry no "
                 "epsilon at all (null in the JSON report), not epsilon 0: no differential-privacy guarantee was claimed.")
    return _section("Privacy", ["institution", "mechanism(s)", "attested releases", "epsilon per release (max)",
                                "epsilon, sum over releases", "epsilon_total reported (max)", "delta, sum", "runs without a mechanism"], [
        [name, ", ".join(inst["privacy_mechanisms"]) or "none", s["releases"], *(_epsilon(s[key]) for key in (
            "epsilon_max", "epsilon_sum", "epsilon_total_reported_max", "delta_sum")),
         ", ".join(s["runs_without_guarantee"]) or "–"]
        for name, inst in report["institutions"].items() for s in [inst["privacy_summary"]]], note=note)


def _epsilon(value: float | None) -> str:
    return NO_GUARANTEE if value is None else f"{value:g}"


def _md_privacy_ledgers(report: dict[str, Any]) -> str:
    rows = [[name, f"`{ledger['path']}`", ledger["entries"], "; ".join(
        f"{r['run'] or 'run ' + r['run_id'] + ' (not in this report)'}: {r['epsilon']:.4g}" for r in ledger["runs"]) or "–",
        f"{ledger['epsilon_basic_composition']:.4g}", f"{ledger['epsilon_composed']:.4g}", f"{ledger['delta']:g}",
        ", ".join(ledger["runs_missing"]) or "–"]
        for name, inst in report["institutions"].items() if (ledger := inst.get("privacy_ledger"))]
    return _section("Privacy across runs (the institutions' own privacy ledgers)", [
        "institution", "privacy ledger", "events", "epsilon of each run alone", "basic composition (sum of the runs)",
        "composed by the accountant (whole history)", "delta", "runs under a mechanism missing from it"], rows,
        empty="No institution's privacy ledger was given (`--privacy-ledger`): privacy is shown as attested only.",
        note="Basic composition adds each run's epsilon (an upper bound); the accountant (dp-accounting, Renyi DP) composes "
             "the whole history at the ledger's delta, usually much smaller. The privacy ledger is the institution's own, "
             "unsigned record.")


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


def _plot_bytes(report: dict[str, Any]) -> bytes:
    """Bytes each institution sent per round; releases the coordinator did not accept crossed in red (PNG bytes)."""
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
    return _save(fig, ax, ticks, plt)


def _plot_epsilon(report: dict[str, Any]) -> bytes:
    """Cumulative epsilon per institution over its attested releases under a mechanism; the institutions without one
    are named, not drawn at 0."""
    plt, fig, ax, index, ticks = _figure(report)
    for name, inst in report["institutions"].items():
        points = sorted((index[(p["run"], p["round"])], p["epsilon"]) for p in inst["privacy"]
                        if (p["run"], p["round"]) in index and p["epsilon"] is not None)
        if points:
            xs = [x for x, _ in points]
            ax.step(xs, list(itertools.accumulate(epsilon for _, epsilon in points)), where="post", marker="o", markersize=4,
                    label=name)
    if without := [name for name, inst in report["institutions"].items() if inst["privacy_summary"]["no_guarantee"]]:
        ax.annotate(f"{NO_GUARANTEE}: {', '.join(without)}"[:120], xy=(0.02, 0.95), xycoords="axes fraction", fontsize=8,
                    va="top", color="darkred")
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="privacy spent per institution (attested, sum of epsilon)",
           ylim=(0, None))
    return _save(fig, ax, ticks, plt)


def _plot_composition(report: dict[str, Any]) -> bytes:
    """Per institution with a privacy ledger: the basic-composition bound against the accountant's composed epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ledgers = [(name, inst["privacy_ledger"]) for name, inst in report["institutions"].items() if inst.get("privacy_ledger")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = range(len(ledgers))
    ax.bar([x - 0.2 for x in xs], [ledger["epsilon_basic_composition"] for _, ledger in ledgers], width=0.4,
           label="basic composition (sum of each run's epsilon)")
    ax.bar([x + 0.2 for x in xs], [ledger["epsilon_composed"] for _, ledger in ledgers], width=0.4,
           label="accountant, whole history composed")
    ax.set(ylabel="epsilon", title="privacy spent across runs (institutions' privacy ledgers)")
    return _save(fig, ax, [name for name, _ in ledgers], plt)


def _figure(report: dict[str, Any]) -> tuple[Any, Any, Any, dict[tuple[str, Any], int], list[str]]:
    """A figure whose x axis is every round of every run in ledger order: (run, round) -> x, and tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(run, round_) for run, round_ in report["rounds_axis"]]
    one_run = len({run for run, _ in points}) <= 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    return plt, fig, ax, {point: x for x, point in enumerate(points)}, [str(r) if one_run else f"{run}:{r}" for run, r in points]


def _save(fig: Any, ax: Any, ticks: list[str], plt: Any) -> bytes:
    if ticks:
        step, long = max(1, -(-len(ticks) // 20)), len(ticks[0]) >= 6  # at most about 20 labels
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], rotation=30 if long else 0, ha="right" if long else "center")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
