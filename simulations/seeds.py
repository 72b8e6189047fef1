"""`fedstill compare --seeds`: the whole comparison once per seed (each seed's own partition, public split and
initialisation) in `<folder>/seed-<k>/`, and the summary across seeds at the folder's top: mean and sample standard
deviation per method and baseline, every seed's own figures and error, and the accuracy-uplink frontier."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.config import RunConfig
from common.errors import ConfigError, FedstillError
from common.files import PRIVATE, atomic_write_text, private_folder
from server.results.run_folder import write_json
from simulations.compare import TABLE, Method, rows_of, run_comparison
from simulations.seeds_report import plot_seeds, seeds_table

K = TypeVar("K")  # what `frontier` places: a run's label, or (label, round)

SUMMARY = "results.json"  # the across-seed summary, at the comparison folder's top (each seed's own is in seed-<k>/)
FEDAVG = "fedavg"
OnStage = Callable[[str, RunConfig | None], Callable[[dict], None] | None]


def seed_folder(folder: Path, seed: int) -> Path:
    return folder / f"seed-{seed}"


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`, `0-4` or `0-2,7` -> the seeds in the order given. Seeds are integers >= 0, each listed once."""
    seeds: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", item)
        if match is None:
            raise ConfigError(f"--seeds expects integers >= 0 or ranges, separated by commas (0,1,2,3,4 or 0-4), "
                              f"got {item!r} in {text!r}")
        first, last = (int(match[3]), int(match[3])) if match[3] else (int(match[1]), int(match[2]))
        if last < first:
            raise ConfigError(f"--seeds range {item!r} runs backwards; write it {last}-{first}")
        seeds.extend(range(first, last + 1))
    twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if twice:
        raise ConfigError(f"--seeds lists seed {', '.join(map(str, twice))} more than once; list each seed once")
    return seeds


def refuse_seed_settings(sets: dict[str, Any], methods: list[Method]) -> None:
    """`--seeds` sets every run's seed itself: a seed from `--set` or a `--method` would be overruled, so it is refused."""
    if "seed" in sets:
        raise ConfigError(f"--seeds sets every run's seed: drop --set seed={sets['seed']} (or drop --seeds to run one seed)")
    for method in methods:
        if "seed" in method.overrides:
            raise ConfigError(f"--seeds sets every run's seed: drop seed={method.overrides['seed']} from --method "
                              f"{method.label}")


def check_folder_kind(folder: Path, *, seeded: bool) -> None:
    """Refuse to write a comparison over seeds into the folder of a comparison without `--seeds`, or the reverse:
    each would overwrite the other's summary at the folder's top."""
    try:
        kept = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(kept, dict) and ("seeds" in kept) != seeded:
        held = "a comparison over seeds" if "seeds" in kept else "a comparison without --seeds"
        raise ConfigError(f"{folder} holds {held}; give this one its own folder (--set run-name=\"...\")"
                          + ("" if seeded else " or add its --seeds"))


def run_seeds(
    base: dict[str, Any],
    folder: Path,
    methods: list[Method],
    seeds: list[int],
    *,
    fedavg_rounds: int,
    with_baselines: bool,
    cpus_per_client: int,
    on_stage: OnStage,
    site: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`run_comparison` once per seed in `<folder>/seed-<k>/` (runs completed earlier with the same settings are
    reused, so a stopped comparison goes on where it stopped), then the summary across seeds, written after each seed.

    A seed whose comparison fails as a whole (its data cannot be partitioned, a baseline fails) is recorded with its
    error and the next seed runs."""
    private_folder(folder)
    done: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for seed in seeds:
        def staged(label: str, cfg: RunConfig | None, seed: int = seed) -> Callable[[dict], None] | None:
            return on_stage(f"seed {seed}: {label}", cfg)

        try:
            done[seed] = run_comparison({**base, "seed": seed}, seed_folder(folder, seed), methods,
                                        fedavg_rounds=fedavg_rounds, with_baselines=with_baselines,
                                        cpus_per_client=cpus_per_client, on_stage=staged, site=site)
        except FedstillError as error:
            done[seed] = {"error": f"{type(error).__name__}: {error}"}
        summary = summarise(done, seeds)
        write_summary(summary, folder)
    return summary


def write_summary(summary: dict[str, Any], folder: Path) -> None:
    """results.json, comparison.md and the two plots at the top of a comparison over seeds."""
    write_json(folder / SUMMARY, summary)
    atomic_write_text(folder / TABLE, seeds_table(summary), mode=PRIVATE)
    plot_seeds(summary, folder)


def summarise(done: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The summary across seeds of `done` (seed -> the summary `run_comparison` returned, or {"error": ...} for a
    seed that failed as a whole); `seeds`: every seed asked for, those not in `done` are still to run."""
    rows = {seed: seed_rows(summary) for seed, summary in done.items()}
    labels = list(dict.fromkeys(label for by_label in rows.values() for label in by_label))
    federated = {label for seed in done for label in _federated(done[seed])}
    entries: dict[str, dict[str, Any]] = {}
    for label in labels:
        per_seed = {str(seed): rows[seed].get(label) or {"error": done[seed].get("error", "no result for this seed")}
                    for seed in done}
        entries[label] = across_seeds(per_seed, federated=label in federated)
    methods = {label: entry for label, entry in entries.items() if label in federated and label != FEDAVG}
    baselines = {label: entry for label, entry in entries.items() if label not in methods}
    scenario = next((dict(s["scenario"]) for s in done.values() if s.get("scenario")), None)
    if scenario is not None:
        scenario.pop("seed", None)
    return {
        "scenario": scenario, "seeds": list(seeds), "seeds_run": list(done),
        "seed_errors": {str(seed): s["error"] for seed, s in done.items() if "error" in s},
        "methods": methods, "baselines": baselines, **frontier_of({**methods, **_only(baselines, FEDAVG)}),
        "round_frontier": round_frontier({**methods, **_only(baselines, FEDAVG)}),
    }


def seed_rows(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One seed's figures per label (`compare.rows_of`'s labels): final accuracy, and for a federated run its
    cumulative uplink per institution, rounds and accuracy curve; {"error": ...} for a run that failed."""
    if "error" in summary:
        return {}
    curves = {label: entry["rounds"] for label, entry in {**summary["methods"], **summary["baselines"]}.items()
              if label in _federated(summary) and "rounds" in entry}
    found: dict[str, dict[str, Any]] = {}
    for row in rows_of(summary):
        label = row["method"]
        if "error" in row:
            found[label] = {"error": row["error"]}
        elif label in curves:
            found[label] = {"accuracy": row["accuracy"], "uplink_per_institution": row["uplink_per_client_total"],
                            "rounds": row["rounds"], "curve": _curve(curves[label])}
        else:
            found[label] = {"accuracy": row["accuracy"]}
    return found


def across_seeds(per_seed: dict[str, dict[str, Any]], *, federated: bool) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with fewer than two) over the seeds that completed; every
    seed's own figures or error stay in `per_seed`. A federated run also gets its uplink and per-round curve."""
    completed = [row for row in per_seed.values() if "error" not in row]
    entry: dict[str, Any] = {
        "per_seed": {seed: {k: v for k, v in row.items() if k != "curve"} for seed, row in per_seed.items()},
        "seeds_completed": len(completed), **_mean_std("accuracy", [row["accuracy"] for row in completed]),
    }
    if federated:
        entry.update(_mean_std("uplink_per_institution", [row["uplink_per_institution"] for row in completed]))
        entry["per_round"] = _per_round([row["curve"] for row in completed])
    return entry


def frontier_of(points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The frontier of the federated runs (the methods and FedAvg) on (mean accuracy up, mean cumulative uplink per
    institution down), sorted by uplink; and each run's uplink as a ratio of FedAvg's and its accuracy minus FedAvg's
    in percentage points, when FedAvg completed."""
    placed = {label: (entry["uplink_per_institution_mean"], entry["accuracy_mean"]) for label, entry in points.items()
              if entry.get("accuracy_mean") is not None and entry.get("uplink_per_institution_mean") is not None}
    versus: dict[str, dict[str, float | None]] = {}
    if FEDAVG in placed:
        uplink, accuracy = placed[FEDAVG]
        versus = {label: {"uplink_ratio": up / uplink if uplink else None, "accuracy_points": 100.0 * (acc - accuracy)}
                  for label, (up, acc) in placed.items()}
    return {"frontier": frontier(placed), "versus_fedavg": versus}


def round_frontier(points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The frontier over every round of the federated runs, not only their last: each run after round r (mean
    accuracy and mean cumulative uplink per institution over the seeds, only rounds every completed seed reached)
    is what stopping it there gives. Sorted by uplink: [{"run", "round", "uplink_per_institution_mean",
    "accuracy_mean"}]."""
    placed = {(label, row["round"]): (row["uplink_per_institution_mean"], row["accuracy_mean"])
              for label, entry in points.items() for row in entry.get("per_round", [])
              if row["seeds"] == entry["seeds_completed"] and row["accuracy_mean"] is not None}
    return [{"run": label, "round": round_, "uplink_per_institution_mean": placed[label, round_][0],
             "accuracy_mean": placed[label, round_][1]} for label, round_ in frontier(placed)]


def frontier(points: dict[K, tuple[float, float]]) -> list[K]:
    """The labels of `points` (label -> (uplink, accuracy)) that no other point dominates (as much accuracy or more
    for as little uplink or less, better in one), sorted by uplink, then accuracy down. Equal points all stay."""
    kept = [label for label, (uplink, accuracy) in points.items()
            if not any(up <= uplink and acc >= accuracy and (up, acc) != (uplink, accuracy) for up, acc in points.values())]
    return sorted(kept, key=lambda label: (points[label][0], -points[label][1]))


def _federated(summary: dict[str, Any]) -> list[str]:
    """The labels of one seed's federated runs: its methods and FedAvg."""
    return [*summary.get("methods", {}), *[label for label in summary.get("baselines", {}) if label == FEDAVG]]


def _only(entries: dict[str, Any], label: str) -> dict[str, Any]:
    return {label: entries[label]} if label in entries else {}


def _curve(rounds: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(round, student accuracy, cumulative uplink per institution) of each round of one run."""
    curve, total = [], 0.0
    for row in rounds:
        total += row["uplink_bytes"] / max(row["clients_replied"], 1)
        curve.append((int(row["round"]), float(row["student_accuracy"]), total))
    return curve


def _per_round(curves: list[list[tuple[int, float, float]]]) -> list[dict[str, Any]]:
    """Per round: the mean and standard deviation of the accuracy, and the mean cumulative uplink per institution,
    over the seeds that reached it."""
    rounds = sorted({point[0] for curve in curves for point in curve})
    rows = []
    for round_ in rounds:
        points = [point for curve in curves for point in curve if point[0] == round_]
        rows.append({"round": round_, "seeds": len(points), **_mean_std("accuracy", [p[1] for p in points]),
                     "uplink_per_institution_mean": statistics.fmean(p[2] for p in points)})
    return rows


def _mean_std(name: str, values: list[float]) -> dict[str, float | None]:
    return {f"{name}_mean": statistics.fmean(values) if values else None,
            f"{name}_std": statistics.stdev(values) if len(values) > 1 else None}
