"""`fedstill compare`: several methods and the baselines on one scenario, same partitions and seeds,
with a markdown table and plots (accuracy per round; accuracy against cumulative uplink per client)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig, default_run_config
from common.errors import ConfigError, FedstillError
from common.files import PRIVATE, atomic_path, atomic_write_text, private_folder
from server.checkpoint import OPERATIONAL_KEYS
from server.results.run_folder import write_json
from simulations import baselines, launcher
from simulations.provision import merged_site, parse_site, provisioned_settings, site_settings
from simulations.scenarios import parse_sets

TABLE = "comparison.md"
SITE_PREFIX = "site."  # in --method: a key of the method's institutions' own settings
PER_ROUND_PLOT = "accuracy_per_round.png"
UPLINK_PLOT = "accuracy_vs_uplink.png"


@dataclass(frozen=True)
class Method:
    label: str
    overrides: dict[str, Any]  # run-config keys
    site: dict[str, Any] | None = None  # its simulated institutions' own settings, on top of --site (as parse_site)


def parse_methods(rules: list[str], methods: list[str]) -> list[Method]:
    """`--rules mean,era` -> one method per aggregation rule; `--method label:key=value,key=value`
    -> a named variant (for example `era-fedmd:aggregation=era,digest-epochs=1`), whose `site.KEY=VALUE` pairs are
    its institutions' own settings (`dp1:privacy=dp-sgd,site.max-epsilon=1`: a budget that a run without a
    mechanism, refused by such a site, must not get)."""
    found = [Method(rule.strip(), {"aggregation": rule.strip()}) for item in rules for rule in item.split(",") if rule.strip()]
    for item in methods:
        label, sep, body = item.partition(":")
        if not sep or not label.strip():
            raise ConfigError(f"--method expects label:key=value,key=value, got {item!r}")
        pairs = [kv.strip() for kv in re.split(r",(?=\s*[A-Za-z][\w.-]*\s*=)", body) if kv.strip()]  # quoted commas stay
        name, site = label.strip(), [kv.removeprefix(SITE_PREFIX) for kv in pairs if kv.startswith(SITE_PREFIX)]
        try:
            settings = parse_site(site)
        except ConfigError as error:
            raise ConfigError(f"--method {name!r}, a site.KEY=VALUE pair: {error}") from None
        found.append(Method(name, parse_sets([kv for kv in pairs if not kv.startswith(SITE_PREFIX)]), settings))
    labels = [m.label for m in found]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"method labels must be unique, got {labels}")
    return found


def run_comparison(
    base: dict[str, Any],
    folder: Path,
    methods: list[Method],
    *,
    fedavg_rounds: int,
    with_baselines: bool,
    cpus_per_client: int,
    on_stage: Callable[[str, RunConfig | None], Callable[[dict], None] | None],
    site: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method, FedAvg (when `fedavg_rounds` > 0) and the baselines; write the report.

    `on_stage(label, cfg)` is called as each stage starts (cfg None for the in-process baselines)
    and may return a callback for that run's progress events; `site`: every simulated institution's settings
    (simulations.provision), with each method's own on top."""
    private_folder(folder)
    summary: dict[str, Any] = {"scenario": None, "methods": {}, "baselines": {}}
    jobs = [(m.label, {**base, **m.overrides}, merged_site(site, m.site)) for m in methods]
    if fedavg_rounds:
        jobs.append(("fedavg", {**base, "method": "fedavg", "num-server-rounds": fedavg_rounds}, site))
    for label, overrides, run_site in jobs:
        overrides = {**overrides, "output-dir": str(folder), "run-name": label}
        try:
            cfg = RunConfig.from_run_config({**default_run_config(), **overrides})
            results = finished_run(folder / label, cfg, run_site)
            if results is None:
                outcome = launcher.simulate(cfg, overrides, cpus_per_client=cpus_per_client, on_event=on_stage(label, cfg),
                                            site=run_site)
                results = outcome.results
            entry = {"run_dir": str(folder / label), "rounds": results["rounds"], "final": results["final"]}
            summary["scenario"] = summary["scenario"] or results["scenario"]
        except FedstillError as error:
            entry = {"error": f"{type(error).__name__}: {error}"}
        (summary["baselines"] if label == "fedavg" else summary["methods"])[label] = entry
    if with_baselines:
        cfg = RunConfig.from_run_config({**default_run_config(), **base})
        summary["baselines"].update(cached_baselines(folder, cfg, on_stage))
    write_json(folder / "results.json", summary)
    atomic_write_text(folder / TABLE, markdown_table(summary), mode=PRIVATE)
    plot_comparison(summary, folder)
    return summary


BASELINES = "baselines.json"


def cached_baselines(folder: Path, cfg: RunConfig, on_stage) -> dict[str, Any]:
    """Local-only and centralised results for `cfg`: from `folder/baselines.json` when an earlier
    comparison in this folder trained them with the same settings, else trained now and kept there."""
    path = folder / BASELINES
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if _same_run(kept.get("scenario"), cfg) and {"local_only", "centralised"} <= set(kept):
            return {"local_only": kept["local_only"], "centralised": kept["centralised"]}
    except (OSError, ValueError, AttributeError):
        pass
    baselines.use_threads(os.cpu_count() or 1)
    on_stage("local-only", None)
    local = baselines.local_only(cfg)
    on_stage("centralised", None)
    central = baselines.centralised(cfg)
    write_json(path, {"scenario": cfg.to_dict(), "local_only": local, "centralised": central})
    return {"local_only": local, "centralised": central}


def finished_run(run_dir: Path, cfg: RunConfig, site: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The results of an earlier, completed run of the same config in `run_dir`, whose simulated institutions were
    given the same settings (`site`: their budgets and site policies; simulations.provision), so that a comparison
    that was interrupted goes on where it stopped; None when there is none. An unfinished or different run there
    is moved aside to `<name>.previous-<n>`, never deleted."""
    results_path = run_dir / "results.json"
    if not run_dir.exists():
        return None
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict) and results.get("status") == "completed" and _same_run(results.get("scenario"), cfg) \
            and provisioned_settings(run_dir, cfg.num_clients) == site_settings(site, cfg.num_clients):
        return results
    n = 1
    while run_dir.with_name(f"{run_dir.name}.previous-{n}").exists():
        n += 1
    run_dir.rename(run_dir.with_name(f"{run_dir.name}.previous-{n}"))
    return None


PROVISIONED = frozenset({"allow-list", "sites-dir", "coordinator-key"})  # filled in per run by the launcher


def _same_run(recorded: Any, cfg: RunConfig) -> bool:
    """Same settings, key by key (keys newer than the recorded run are taken as their defaults then), leaving out
    the provisioned paths and how the run was carried out (OPERATIONAL_KEYS: time-outs, max-in-flight)."""
    if not isinstance(recorded, dict):
        return False
    wanted = cfg.to_dict()
    ignored = PROVISIONED | OPERATIONAL_KEYS
    return all(recorded[key] == value for key, value in wanted.items() if key in recorded and key not in ignored)


def rows_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method or baseline: final accuracy, rounds, uplink per client (total and per round)."""
    rows = []
    runs = {**summary["methods"], **{k: v for k, v in summary["baselines"].items() if k == "fedavg"}}
    for label, entry in runs.items():
        if "error" in entry:
            rows.append({"method": label, "error": entry["error"]})
            continue
        rounds = entry["rounds"]
        per_client = [r["uplink_bytes"] / max(r["clients_replied"], 1) for r in rounds]
        rows.append({
            "method": label, "accuracy": entry["final"]["student_accuracy"], "rounds": len(rounds),
            "uplink_per_client_total": sum(per_client), "uplink_per_client_round": per_client[-1] if per_client else 0,
            "teachers": entry["final"].get("teacher_accuracy_mean"), **_metrics(entry["final"], "student_{}"),
        })
    local, central = summary["baselines"].get("local_only"), summary["baselines"].get("centralised")
    if local:
        rows.append({"method": "local-only (mean of institutions)", "accuracy": local["accuracy_mean"],
                     "note": f"min {local['accuracy_min']:.4f}, max {local['accuracy_max']:.4f}, {local['epochs']} epochs",
                     **_metrics(local, "{}_mean")})
    if central:
        for role in ("student", "teacher"):
            rows.append({"method": f"centralised {role} ({central[role]['model']})", "accuracy": central[role]["accuracy"],
                         "note": f"pooled private data, {central['epochs']} epochs", **_metrics(central[role], "{}")})
    return rows


IMBALANCE_METRICS = ("balanced_accuracy", "macro_f1", "auroc")  # common.metrics, beside accuracy


def _metrics(source: dict[str, Any], key: str) -> dict[str, float]:
    """The imbalance-aware metrics `source` holds (under `key` with the metric's name filled in); none
    for results recorded before they were."""
    return {name: source[key.format(name)] for name in IMBALANCE_METRICS if source.get(key.format(name)) is not None}


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| method | student test accuracy | rounds | uplink per client, total | per round | note |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows_of(summary):
        if "error" in row:
            lines.append(f"| {row['method']} | failed | | | | {_cell(row['error'])} |")
            continue
        total, per_round = row.get("uplink_per_client_total"), row.get("uplink_per_client_round")
        note = row.get("note") or (f"teachers' mean {row['teachers']:.4f}" if row.get("teachers") is not None else "")
        lines.append(
            f"| {row['method']} | {row['accuracy']:.4f} | {row.get('rounds', '')} | "
            f"{_mb(total)} | {_mb(per_round)} | {note} |"
        )
    scenario = summary.get("scenario") or {}
    header = f"# Comparison: {scenario.get('scenario', '?')}\n\n" if scenario else "# Comparison\n\n"
    return header + "\n".join(lines) + "\n" + metrics_table(rows_of(summary))


def metrics_table(rows: list[dict[str, Any]]) -> str:
    """Balanced accuracy, macro-F1 and AUROC on the test set, for the rows that have them (empty if none)."""
    rows = [row for row in rows if "macro_f1" in row]
    if not rows:
        return ""
    lines = ["", "## Imbalance-aware metrics (test set)", "",
             "| method | accuracy | balanced accuracy | macro-F1 | AUROC |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['method']} | {row['accuracy']:.4f} | "
              + " | ".join(f"{row.get(name, float('nan')):.4f}" for name in IMBALANCE_METRICS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell: no row breaks, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value / 1e6:.3f} MB"


def plot_comparison(summary: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {**summary["methods"], **{k: v for k, v in summary["baselines"].items() if k == "fedavg"}}
    runs = {label: entry for label, entry in runs.items() if "rounds" in entry}
    fig_r, ax_r = plt.subplots(figsize=(7, 4.5))
    fig_u, ax_u = plt.subplots(figsize=(7, 4.5))
    for i, (label, entry) in enumerate(runs.items()):
        style = run_style(plt, i, label)
        rounds = entry["rounds"]
        acc = [r["student_accuracy"] for r in rounds]
        cumulative, total = [], 0.0
        for r in rounds:
            total += r["uplink_bytes"] / max(r["clients_replied"], 1)
            cumulative.append(total)
        ax_r.plot([r["round"] for r in rounds], acc, markersize=4, label=label, **style)
        ax_u.plot(cumulative, acc, markersize=4, label=label, **style)
    for name, value, linestyle in _reference_lines(summary):
        for ax in (ax_r, ax_u):
            ax.axhline(value, linestyle=linestyle, color="grey", linewidth=1)
            ax.annotate(name, xy=(0.01, value), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    ax_r.set(xlabel="round", ylabel="student test accuracy", title="accuracy per round")
    ax_u.set(xlabel="cumulative uplink bytes per client", ylabel="student test accuracy",
             title="accuracy against uplink", xscale="log")
    for fig, ax, name in ((fig_r, ax_r, PER_ROUND_PLOT), (fig_u, ax_u, UPLINK_PLOT)):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(folder / name, mode=PRIVATE, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)


def run_style(plt: Any, index: int, label: str) -> dict[str, Any]:
    """The colour and marker of the `index`-th run in a plot (`plt`: matplotlib.pyplot): its own for each of up to
    20 methods (tab20's dark shades first, palette(j) its j-th colour as RGBA); FedAvg in black."""
    if label == "fedavg":
        return {"color": "black", "marker": "s"}
    markers = "osD^v<>ph*"
    return {"color": plt.get_cmap("tab20")((2 * index + index // 10) % 20), "marker": markers[index % len(markers)]}


def _reference_lines(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    lines = []
    if local := summary["baselines"].get("local_only"):
        lines.append(("local-only mean", local["accuracy_mean"], ":"))
    if central := summary["baselines"].get("centralised"):
        lines.append(("centralised student", central["student"]["accuracy"], "--"))
    return lines
