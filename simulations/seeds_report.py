"""The across-seed summary as text and plots (simulations/seeds.py): a mean ± std table, a per-seed table, the
frontier; accuracy per round with a band per method, and accuracy against cumulative uplink per institution."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.files import PRIVATE, atomic_path
from simulations.compare import PER_ROUND_PLOT, UPLINK_PLOT, _cell, _mb, run_style

FEDAVG = "fedavg"


def seeds_table(summary: dict[str, Any]) -> str:
    """comparison.md at the top of a comparison over seeds."""
    scenario = (summary.get("scenario") or {}).get("scenario", "?")
    run, asked = summary["seeds_run"], summary["seeds"]
    pending = [seed for seed in asked if seed not in run]
    header = (f"# Comparison over seeds: {scenario}\n\nseeds {_seeds(run)}"
              + (f" ({len(run)} of {len(asked)}; still to run: {_seeds(pending)})" if pending else "") + "\n")
    return "\n".join([header, mean_std_table(summary), per_seed_table(summary), frontier_text(summary)])


def mean_std_table(summary: dict[str, Any]) -> str:
    """Per method and baseline: seeds completed, mean ± std of the final accuracy and of the cumulative uplink per
    institution, against FedAvg, and the seeds that failed."""
    versus = summary.get("versus_fedavg") or {}
    lines = ["## Mean ± standard deviation over seeds", "",
             "| method | seeds | student test accuracy | uplink per institution, total | uplink / FedAvg's | "
             "accuracy - FedAvg's | failed |", "|---|---:|---:|---:|---:|---:|---|"]
    for label, entry in {**summary["methods"], **summary["baselines"]}.items():
        against = versus.get(label) or {}
        ratio, points = against.get("uplink_ratio"), against.get("accuracy_points")
        uplink = _plus_minus(entry.get("uplink_per_institution_mean"), entry.get("uplink_per_institution_std"),
                             lambda value: f"{value / 1e6:.3f}")
        lines.append(
            f"| {label} | {entry['seeds_completed']}/{len(entry['per_seed'])} | "
            f"{_plus_minus(entry['accuracy_mean'], entry['accuracy_std'], '{:.4f}'.format)} | {uplink and uplink + ' MB'} | "
            f"{'' if ratio is None else f'{ratio:.3g}×'} | {'' if points is None else f'{points:+.2f} points'} | "
            f"{_failures(entry)} |")
    for seed, error in summary.get("seed_errors", {}).items():
        lines.append(f"\nseed {seed} failed as a whole: {_cell(error)}")
    return "\n".join(lines) + "\n"


def per_seed_table(summary: dict[str, Any]) -> str:
    """Final accuracy of each method and baseline on each seed that ran; `failed` where it failed (the error is in
    the table above and in results.json)."""
    seeds = [str(seed) for seed in summary["seeds_run"]]
    lines = ["## Per seed (final student test accuracy)", "",
             "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for label, entry in {**summary["methods"], **summary["baselines"]}.items():
        cells = [entry["per_seed"].get(seed, {"error": ""}) for seed in seeds]
        lines.append(f"| {label} | " + " | ".join("failed" if "error" in cell else f"{cell['accuracy']:.4f}"
                                                  for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def frontier_text(summary: dict[str, Any]) -> str:
    """The runs on the frontier (mean accuracy up, mean uplink per institution down), sorted by uplink, and those
    dominated."""
    runs = {**summary["methods"], **{k: v for k, v in summary["baselines"].items() if k == FEDAVG}}
    on = summary["frontier"]
    lines = ["## Frontier: mean accuracy against mean cumulative uplink per institution", ""]
    if not on:
        return "\n".join([*lines, "no method completed on any seed: no frontier"]) + "\n"
    lines += ["| method | uplink per institution, total | student test accuracy |", "|---|---:|---:|"]
    lines += [f"| {label} | {_mb(runs[label]['uplink_per_institution_mean'])} | {runs[label]['accuracy_mean']:.4f} |"
              for label in on]
    dominated = [label for label, entry in runs.items() if label not in on and entry["accuracy_mean"] is not None]
    if dominated:
        lines += ["", f"dominated (another run has as much accuracy or more for as little uplink or less): "
                      f"{', '.join(dominated)}"]
    by_round = summary.get("round_frontier") or []
    if by_round:
        lines += ["", "### Frontier over every round", "",
                  "Each run after each of its rounds (what stopping it there gives, exactly so when its settings do not "
                  "depend on the number of rounds), the points no other dominates:", "",
                  "| run | after round | uplink per institution, total | student test accuracy |", "|---|---:|---:|---:|"]
        lines += [f"| {point['run']} | {point['round']} | {_mb(point['uplink_per_institution_mean'])} | "
                  f"{point['accuracy_mean']:.4f} |" for point in by_round]
    return "\n".join(lines) + "\n"


def _plus_minus(mean: float | None, std: float | None, show: Callable[[float], str]) -> str:
    if mean is None:
        return ""
    return show(mean) if std is None else f"{show(mean)} ± {show(std)}"


def _failures(entry: dict[str, Any]) -> str:
    return "; ".join(f"seed {seed}: {_cell(row['error'])}" for seed, row in entry["per_seed"].items() if "error" in row)


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) or "none"


def plot_seeds(summary: dict[str, Any], folder: Path) -> None:
    """accuracy_per_round.png (mean per round, a band of ± one std over seeds) and accuracy_vs_uplink.png (each run's
    final mean with error bars of one std both ways, log x, the frontier's points joined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {**summary["methods"], **{k: v for k, v in summary["baselines"].items() if k == FEDAVG}}
    fig_r, ax_r = plt.subplots(figsize=(7, 4.5))
    fig_u, ax_u = plt.subplots(figsize=(7, 4.5))
    for i, (label, entry) in enumerate(runs.items()):
        if entry["accuracy_mean"] is None:
            continue
        style = run_style(plt, i, label)
        _per_round_band(ax_r, entry, label, style)
        _final_point(ax_u, entry, label, style)
    on = summary["frontier"]
    if len(on) > 1:
        ax_u.plot([runs[label]["uplink_per_institution_mean"] for label in on],
                  [runs[label]["accuracy_mean"] for label in on], color="black", linestyle="--", linewidth=1,
                  label="frontier")
    for name, value, linestyle in _reference_lines(summary):
        for ax in (ax_r, ax_u):
            ax.axhline(value, linestyle=linestyle, color="grey", linewidth=1)
            ax.annotate(name, xy=(0.01, value), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    seeds = len(summary["seeds_run"])
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_r.set(xlabel="round", ylabel="student test accuracy", title=f"accuracy per round: mean ± std over {seeds} seeds")
    ax_u.set(xlabel="cumulative uplink bytes per institution", ylabel="student test accuracy", xscale="log",
             title=f"final accuracy against uplink: mean ± std over {seeds} seeds")
    for fig, ax, name in ((fig_r, ax_r, PER_ROUND_PLOT), (fig_u, ax_u, UPLINK_PLOT)):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(folder / name, mode=PRIVATE, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)


def _per_round_band(ax: Any, entry: dict[str, Any], label: str, style: dict[str, Any]) -> None:
    rows = entry["per_round"]
    rounds, mean = [row["round"] for row in rows], [row["accuracy_mean"] for row in rows]
    low = [row["accuracy_mean"] - (row["accuracy_std"] or 0.0) for row in rows]
    high = [row["accuracy_mean"] + (row["accuracy_std"] or 0.0) for row in rows]
    ax.plot(rounds, mean, markersize=4, label=label, **style)
    ax.fill_between(rounds, low, high, color=style["color"], alpha=0.2, linewidth=0)


def _final_point(ax: Any, entry: dict[str, Any], label: str, style: dict[str, Any]) -> None:
    rows = entry["per_round"]
    ax.plot([row["uplink_per_institution_mean"] for row in rows], [row["accuracy_mean"] for row in rows],
            color=style["color"], alpha=0.35, linewidth=1)
    ax.errorbar(entry["uplink_per_institution_mean"], entry["accuracy_mean"], xerr=entry["uplink_per_institution_std"],
                yerr=entry["accuracy_std"], markersize=6, capsize=3, linestyle="none", label=label, **style)


def _reference_lines(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    """The local-only and centralised student means across seeds, as horizontal lines."""
    lines = []
    for label, entry in summary["baselines"].items():
        if entry["accuracy_mean"] is None:
            continue
        if label.startswith("local-only"):
            lines.append(("local-only mean", entry["accuracy_mean"], ":"))
        elif label.startswith("centralised student"):
            lines.append(("centralised student", entry["accuracy_mean"], "--"))
    return lines
