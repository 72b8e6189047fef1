"""`fedstill privacy-sweep`: the student's accuracy against each institution's privacy budget epsilon.

One run without privacy, then one per budget: every simulated institution gets `max-epsilon` = that
budget (in its own site.toml; `--site` adds site-policy keys to every run) and the mechanism calibrates
its noise to spend exactly that budget over the run (dp-noise-multiplier = 0, pate-sigma = 0). Runs already completed in the sweep folder
are reused, so an interrupted sweep goes on where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import PRIVACY, RunConfig, default_run_config
from common.errors import ConfigError, FedstillError
from common.files import PRIVATE, atomic_path, atomic_write_text, private_folder
from server.results.run_folder import write_json
from simulations import launcher
from simulations.compare import _cell, finished_run

TABLE, PLOT = "sweep.md", "accuracy_vs_epsilon.png"
DEFAULT_DELTA = 1e-5


def parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons: expected numbers separated by commas, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ConfigError(f"--epsilons: every budget must be a finite number > 0, got {text!r}")
    return sorted(set(values))


def run_sweep(
    base: dict[str, Any], folder: Path, mechanism: str, epsilons: list[float], *, delta: float, cpus_per_client: int,
    on_stage: Callable[[str, RunConfig], Callable[[dict], None] | None], site: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the non-private reference and one run per budget; write results.json, sweep.md and the plot.
    `site`: every simulated institution's site-policy keys (simulations.provision), in every run."""
    if mechanism not in PRIVACY or mechanism == "none":
        raise ConfigError(f"--mechanism must be one of {[p for p in PRIVACY if p != 'none']}, got {mechanism!r}")
    private_folder(folder)
    jobs: list[tuple[str, dict[str, Any], dict[str, Any] | None, float | None]] = [("none", {"privacy": "none"}, site, None)]
    for eps in epsilons:
        calibrate = {"dp-noise-multiplier": 0.0} if mechanism == "dp-sgd" else {"pate-sigma": 0.0}
        jobs.append((f"eps-{eps:g}", {"privacy": mechanism, **calibrate}, {**(site or {}), "max-epsilon": eps, "delta": delta}, eps))
    summary: dict[str, Any] = {"mechanism": mechanism, "delta": delta, "scenario": None, "points": []}
    for label, extra, site, budget in jobs:
        overrides = {**base, **extra, "output-dir": str(folder), "run-name": label}
        point: dict[str, Any] = {"label": label, "budget": budget}
        try:
            cfg = RunConfig.from_run_config({**default_run_config(), **overrides})
            results = finished_run(folder / label, cfg, site)
            if results is None:
                results = launcher.simulate(cfg, overrides, cpus_per_client=cpus_per_client,
                                            on_event=on_stage(label, cfg), site=site).results
            privacy = results.get("privacy") or {}
            point.update(accuracy=results["final"]["student_accuracy"], epsilon_spent_max=privacy.get("epsilon_max"),
                         refusals=len(privacy.get("refusals", [])), teachers=results["final"].get("teacher_accuracy_mean"),
                         run_dir=str(folder / label))
            summary["scenario"] = summary["scenario"] or results["scenario"]
        except FedstillError as error:
            point["error"] = f"{type(error).__name__}: {error}"
        summary["points"].append(point)
    write_json(folder / "results.json", summary)
    atomic_write_text(folder / TABLE, sweep_table(summary), mode=PRIVATE)
    plot_sweep(summary, folder / PLOT)
    return summary


def sweep_table(summary: dict[str, Any]) -> str:
    reference = next((p.get("accuracy") for p in summary["points"] if p["label"] == "none"), None)
    lines = [f"# Privacy sweep: {summary['mechanism']}, delta = {summary['delta']:g}", "",
             "| budget epsilon | student test accuracy | vs non-private | largest epsilon spent | teachers' mean | refusals |",
             "|---:|---:|---:|---:|---:|---:|"]
    for point in summary["points"]:
        budget = "none (non-private)" if point["budget"] is None else f"{point['budget']:g}"
        if "error" in point:
            lines.append(f"| {budget} | failed: {_cell(point['error'][:300])} | | | | |")
            continue
        gap = "" if reference is None or point["budget"] is None else f"{(point['accuracy'] - reference) * 100:+.2f} pts"
        spent = "" if point.get("epsilon_spent_max") is None else f"{point['epsilon_spent_max']:.3f}"
        teachers = "" if point.get("teachers") is None else f"{point['teachers']:.4f}"
        lines.append(f"| {budget} | {point['accuracy']:.4f} | {gap} | {spent} | {teachers} | {point.get('refusals', 0)} |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in summary["points"] if "error" not in p]
    private = [p for p in points if p["budget"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["budget"] for p in private], [p["accuracy"] for p in private], marker="o", label=summary["mechanism"])
    for p in points:
        if p["budget"] is None:
            ax.axhline(p["accuracy"], color="grey", linestyle="--", label="non-private")
    ax.set(xscale="log", xlabel=f"privacy budget epsilon per institution (delta {summary['delta']:g})",
           ylabel="student test accuracy", title="accuracy against privacy")
    if private:  # the budgets themselves as ticks, written plainly (1, 2, 4, 8), not as powers of ten
        ax.set_xticks([p["budget"] for p in private], [f"{p['budget']:g}" for p in private])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, mode=PRIVATE, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
