"""`fedstill simulate`, `compare`, `privacy-sweep` and `scenarios`: run federations on this machine and print
their results.

The tables and summaries these commands print wrap at the terminal width (`soft_wrap=False`), as they
always have; the other commands keep each path and finding on one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.errors import ConfigError, FedstillError
from simulations.cli.console import console, fail

if TYPE_CHECKING:
    from common.config import RunConfig

OnEvent = Callable[[dict[str, Any]], None]
SITE_HELP = ("Every simulated institution's own setting: --site max-epsilon=4 --site delta=1e-5 (its budget, into "
             "site.toml), any site-policy key, --site class-counts=true --site counts=exact (into site-policy.toml); "
             "for one institution: --site institution-2.class-counts=true (repeatable).")


def simulate(
    scenario: str = typer.Argument(None, help="Scenario name (see `fedstill scenarios`) or a .toml file of run-config keys."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a run-config key: --set num-server-rounds=3 (repeatable)."),
    cpus_per_client: int = typer.Option(1, min=1, help="CPUs Ray reserves per simulated client."),
    timeout: float = typer.Option(0, help="Stop the run after this many seconds (0: no limit)."),
    site: list[str] = typer.Option([], "--site", help=SITE_HELP),
    profile: bool = typer.Option(False, "--profile", help="Also print where a round's time went: each phase on the "
                                 "nodes and the server, mean seconds and share of the round (results.json rounds[].phases)."),
    ray_address: str = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", show_default=False,
                                    help="Run the clients on this existing Ray cluster: the head's host:port, as `ray "
                                    "start --head` prints it (default: RAY_ADDRESS; unset, a Ray instance on this machine)."),
) -> None:
    """Run a scenario on Flower's simulation engine and print its results."""
    from simulations import launcher
    from simulations.provision import parse_site
    from simulations.ray_cluster import cluster_address
    from simulations.scenarios import dataset_fit, parse_sets, resolve

    try:
        settings = parse_site(site)
        overrides, cfg = resolve(scenario, set_, Path.cwd())
        if (warning := dataset_fit(scenario, parse_sets(set_))) is not None:
            console.print(warning, style="yellow", highlight=False)
        preflight_sites(cfg, settings)
        preflight(cfg)
        address = cluster_address(ray_address)
        console.print(f"[bold]fedstill[/] {cfg.scenario}: {cfg.num_clients} clients, {cfg.partitioner}, "
                      f"{cfg.num_server_rounds} rounds -> {launcher.resolve_run_dir(cfg)}", soft_wrap=False)
        slots = preflight_cluster(address, cpus_per_client) if address else None
        with _progress() as progress:
            task = progress.add_task("starting Flower", total=cfg.num_server_rounds)
            outcome = launcher.simulate(
                cfg, overrides, cpus_per_client=cpus_per_client,
                on_event=lambda event: _show(progress, task, event), timeout_s=timeout or None,
                site=settings, ray_address=address, client_slots=slots,
            )
    except FedstillError as error:
        fail(error)
    print_results(outcome.results, outcome.run_dir)
    if profile:
        print_profile(outcome.results)


def compare(
    scenario: str = typer.Argument(None, help="Scenario name or .toml file."),
    rules: list[str] = typer.Option([], "--rules", "-r", help="Aggregation rules to compare, comma-separated (repeatable)."),
    method: list[str] = typer.Option([], "--method", "-m", help="A named variant: label:key=value,key=value (repeatable); "
                                     "site.KEY=VALUE sets that method's institutions' own settings on top of --site "
                                     "(label:privacy=dp-sgd,site.max-epsilon=1)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a run-config key for every method (repeatable)."),
    fedavg_rounds: int = typer.Option(20, help="Rounds of the FedAvg baseline (0: skip it)."),
    baselines: bool = typer.Option(True, help="Also train the local-only and centralised baselines."),
    cpus_per_client: int = typer.Option(1, min=1, help="CPUs Ray reserves per simulated client."),
    site: list[str] = typer.Option([], "--site", help=SITE_HELP),
    seeds: str = typer.Option(None, "--seeds", show_default=False, help="Run the whole comparison once per seed "
                              "(0,1,2,3,4 or 0-4), each on its own partition, public split and initialisation, in "
                              "<folder>/seed-<k>/; then mean ± std over seeds and the accuracy-uplink frontier at the top."),
) -> None:
    """Compare aggregation rules and variants with FedAvg, local-only and centralised baselines."""
    from common.config import RunConfig, default_run_config
    from simulations.compare import TABLE, parse_methods, run_comparison
    from simulations.provision import merged_site, parse_site
    from simulations.scenarios import dataset_fit, parse_sets, resolve
    from simulations.seeds import check_folder_kind, parse_seeds, refuse_seed_settings, run_seeds

    try:
        settings = parse_site(site)
        overrides, cfg = resolve(scenario, set_, Path.cwd())
        if (warning := dataset_fit(scenario, parse_sets(set_))) is not None:
            console.print(warning, style="yellow", highlight=False)
        methods = parse_methods(rules or ([] if method else ["mean"]), method)
        seed_list = None if seeds is None else parse_seeds(seeds)
        if seed_list is not None:
            refuse_seed_settings(parse_sets(set_), methods)
        folder = Path(cfg.output_dir) / f"compare-{cfg.run_name}"
        check_folder_kind(folder, seeded=seed_list is not None)
        base = {k: v for k, v in overrides.items() if k not in ("run-name", "output-dir")}
        for variant in methods:  # each method's own privacy and rule
            try:
                variant_cfg = RunConfig.from_run_config({**default_run_config(), **base, **variant.overrides})
            except ConfigError:
                continue  # reported in that method's row
            preflight_sites(variant_cfg, merged_site(settings, variant.site))
        for seed in seed_list or [cfg.seed]:  # every seed's data splits as asked, before hours of runs
            preflight(dataclasses.replace(cfg, seed=seed))
        console.print(f"[bold]fedstill compare[/] {cfg.scenario}: {', '.join(m.label for m in methods)}"
                      f"{', fedavg' if fedavg_rounds else ''}{_seeds_line(seed_list, set_, cfg)} -> {folder}",
                      soft_wrap=False)
        options: dict[str, Any] = {"fedavg_rounds": fedavg_rounds, "with_baselines": baselines,
                                   "cpus_per_client": cpus_per_client, "site": settings}
        with _progress() as progress, _stages(progress) as on_stage:
            if seed_list is None:
                summary = run_comparison(base, folder, methods, on_stage=on_stage, **options)
            else:
                summary = run_seeds(base, folder, methods, seed_list, on_stage=on_stage, **options)
    except FedstillError as error:
        fail(error)
    console.print((folder / TABLE).read_text(), markup=False, soft_wrap=False)
    failed = compare_failures(summary)
    if failed:
        console.print(f"[red]failed[/]: {', '.join(failed)} (see {folder / 'results.json'})", soft_wrap=False)
        raise typer.Exit(code=1)


def _seeds_line(seeds: list[int] | None, sets: list[str], cfg: RunConfig) -> str:
    """What the start line says of a comparison over seeds, and how to resume it when its folder's name is a timestamp."""
    from simulations.scenarios import parse_sets

    if seeds is None:
        return ""
    resume = "" if "run-name" in parse_sets(sets) else f" (to go on after a stop: the same command with --set run-name=\"{cfg.run_name}\")"
    return f", seeds {', '.join(map(str, seeds))}{resume}"


@contextlib.contextmanager
def _stages(progress: Progress) -> Iterator[Callable[[str, RunConfig | None], OnEvent]]:
    """A comparison's `on_stage`: a progress line per stage (run or baseline), each ended as the next starts."""
    stages: list[TaskID] = []

    def on_stage(label: str, stage_cfg: RunConfig | None) -> OnEvent:
        if stages:  # stages run one after another: the previous one has ended
            _end(progress, stages[-1])
        task = progress.add_task(label, total=stage_cfg.num_server_rounds if stage_cfg else None)
        stages.append(task)
        return lambda event: _show(progress, task, event, label)

    yield on_stage
    if stages:
        _end(progress, stages[-1])


def compare_failures(summary: dict[str, Any]) -> list[str]:
    """The runs and baselines of a comparison that failed; for a comparison over seeds, each with its seeds."""
    runs = {**summary["methods"], **summary["baselines"]}
    if "seeds" not in summary:
        return [label for label, entry in runs.items() if "error" in entry]
    failed = [f"{label} (seed {', '.join(seed for seed, row in entry['per_seed'].items() if 'error' in row)})"
              for label, entry in runs.items() if entry["seeds_completed"] < len(entry["per_seed"])]
    return failed + [f"seed {seed}" for seed in summary["seed_errors"]]


def privacy_sweep(
    scenario: str = typer.Argument(None, help="Scenario name or .toml file."),
    mechanism: str = typer.Option("dp-sgd", help="dp-sgd (DP teacher training) or pate (GNMax votes inside each institution)."),
    epsilons: str = typer.Option("1,2,4,8", help="Budgets epsilon per institution, comma-separated."),
    delta: float = typer.Option(1e-5, help="Each institution's delta."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a run-config key for every run (repeatable)."),
    cpus_per_client: int = typer.Option(1, min=1, help="CPUs Ray reserves per simulated client."),
    site: list[str] = typer.Option([], "--site", help="Every simulated institution's site-policy key, as for simulate: "
                                   "--site class-counts=true (repeatable); the sweep sets max-epsilon and delta itself."),
) -> None:
    """Student accuracy against each institution's privacy budget, with a non-private reference."""
    from simulations.privacy_sweep import TABLE, parse_epsilons, run_sweep
    from simulations.provision import parse_site
    from simulations.scenarios import resolve

    try:
        settings = parse_site(site, budget=False)
        overrides, cfg = resolve(scenario, set_, Path.cwd())
        preflight_sites(cfg, settings, privacy=mechanism)
        preflight(cfg)
        budgets = parse_epsilons(epsilons)
        if not 0 < delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {delta}")
        folder = Path(cfg.output_dir) / f"privacy-sweep-{cfg.run_name or cfg.scenario}-{mechanism}"
        base = {k: v for k, v in overrides.items() if k not in ("run-name", "output-dir")}
        console.print(f"[bold]fedstill privacy-sweep[/] {cfg.scenario}: {mechanism}, epsilon {budgets} -> {folder}",
                      soft_wrap=False)
        with _progress() as progress:
            stages: list[TaskID] = []

            def on_stage(label: str, stage_cfg: RunConfig) -> OnEvent:
                if stages:
                    _end(progress, stages[-1])
                stages.append(progress.add_task(label, total=stage_cfg.num_server_rounds))
                return lambda event: _show(progress, stages[-1], event, label)

            summary = run_sweep(base, folder, mechanism, budgets, delta=delta, cpus_per_client=cpus_per_client,
                                on_stage=on_stage, site=settings)
            if stages:
                _end(progress, stages[-1])
    except FedstillError as error:
        fail(error)
    console.print((folder / TABLE).read_text(), markup=False, soft_wrap=False)
    if any("error" in point for point in summary["points"]):
        console.print(f"[red]some runs failed[/] (see {folder / 'results.json'})", soft_wrap=False)
        raise typer.Exit(code=1)


def scenarios() -> None:
    """List the scenarios shipped in simulations/scenarios."""
    from simulations.scenarios import list_scenarios

    for name in list_scenarios():
        console.print(name, soft_wrap=False)


def preflight(cfg: RunConfig) -> None:
    """Fail before starting Flower when the data is missing or cannot be partitioned as asked."""
    from common.tasks.partition import partition_rows
    from common.tasks.registry import load_split

    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    partition_rows(split, cfg, 0)


def preflight_cluster(address: str, cpus_per_client: int) -> int:
    """Reach the Ray cluster the clients are to run on, and say which it is, before starting Flower; how many
    clients it runs at once."""
    from simulations.ray_cluster import join

    cluster = join(address, cpus_per_client)
    console.print(f"joining {cluster.describe(cpus_per_client)}", soft_wrap=False, highlight=False)
    return cluster.client_slots(cpus_per_client)


def preflight_sites(cfg: RunConfig, site: dict[str, Any] | None, *, privacy: str | None = None) -> None:
    """Fail before starting Flower when `--site` names a bad setting or institution, or when the institutions'
    policies refuse what the run's rule needs (under
    `privacy`, when it is not cfg's): the policies a resumed run's institutions already have, else `site`'s."""
    from server.results.run_folder import resolve_run_dir
    from simulations.provision import ALLOW_LIST, SITES, check_class_counts, site_settings

    site_settings(site, cfg.num_clients)
    run_dir = resolve_run_dir(cfg)
    resumed = run_dir / SITES if cfg.resume and (run_dir / ALLOW_LIST).is_file() else None
    check_class_counts(cfg, site, privacy=privacy, sites_dir=resumed)


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn(), console=console)


def _end(progress: Progress, task: TaskID) -> None:
    """Stop the spinner of a stage with no round count (the in-process baselines)."""
    stage = next(t for t in progress.tasks if t.id == task)
    if stage.total is None:
        progress.update(task, total=1, completed=1, description=f"{stage.description}: done")


def _show(progress: Progress, task: TaskID, event: dict[str, Any], label: str = "") -> None:
    prefix = f"{label}: " if label else ""
    kind = event.get("event")
    if kind == "started":
        progress.update(task, description=f"{prefix}waiting for nodes")
    elif kind == "nodes":
        progress.update(task, description=f"{prefix}{event['count']} nodes, round 1")
    elif kind == "round":
        done = event["round"] >= next(t.total for t in progress.tasks if t.id == task)
        step = "done" if done else f"round {event['round'] + 1}"
        progress.update(task, completed=event["round"],
                        description=f"{prefix}student acc {event['student_accuracy']:.4f}, {step}")


def print_results(results: dict[str, Any], run_dir: Path) -> None:
    """The per-round table and the headline figures."""
    table = Table(title=f"fedstill: {results['scenario']['scenario']}")
    for column in ("round", "student acc", "ensemble acc", "replied", "uplink MB", "downlink MB", "wall s"):
        table.add_column(column, justify="right")
    for row in results["rounds"]:
        ensemble = row.get("ensemble_accuracy")
        table.add_row(str(row["round"]), f"{row['student_accuracy']:.4f}", "-" if ensemble is None else f"{ensemble:.4f}",
                      str(row["clients_replied"]), f"{row['uplink_bytes'] / 1e6:.2f}",
                      f"{row['downlink_bytes'] / 1e6:.2f}", f"{row['wall_s']:.1f}")
    console.print(table, soft_wrap=False)
    final = results["final"]
    teacher = final.get("teacher_accuracy_mean")
    console.print(
        f"student accuracy [bold]{final['student_accuracy']:.4f}[/]"
        + (f" vs teachers' mean {teacher:.4f}" if teacher is not None else "")
        + f"; student {final['student_params']:,} params"
        + (f" vs largest teacher {final['largest_teacher_params']:,}" if final.get("largest_teacher_params") else "")
        + f"; uplink {final['uplink_bytes_total'] / 1e6:.1f} MB\nrun folder: {run_dir}",
        soft_wrap=False,
    )
    if (warning := near_chance(results)) is not None:
        console.print(warning, style="yellow", highlight=False)


def print_profile(results: dict[str, Any]) -> None:
    """Where a round's time went: each phase's mean seconds over the rounds and share of the round, and the server's
    peak memory."""
    from server.results.phases import NOTE, phase_lines
    from server.results.schema import RoundRow

    lines = phase_lines([RoundRow.from_json(row) for row in results.get("rounds", [])])
    if not lines:
        console.print("no profile: the run's rounds carry no phases", style="yellow")
        return
    table = Table(title="where a round's time went")
    table.add_column("where")
    table.add_column("phase")
    table.add_column("mean s", justify="right")
    table.add_column("% of round", justify="right")
    for line in lines:
        table.add_row(line.where, line.label, "-" if line.mean_s is None else f"{line.mean_s:.3f}",
                      "-" if line.share is None else f"{100 * line.share:.1f}")
    console.print(table, soft_wrap=False)
    console.print(NOTE, soft_wrap=False, highlight=False)
    peak = (results.get("final") or {}).get("server_peak_rss_bytes")
    if peak is not None:
        console.print(f"server peak memory (RSS): {peak / 2**20:,.0f} MiB", soft_wrap=False, highlight=False)


def near_chance(results: dict[str, Any]) -> str | None:
    """A warning when the teachers' mean accuracy is under twice chance: local training too short (or the wrong
    settings) for this data set, so the student has little to learn from."""
    from common.tasks.registry import label_names

    teacher, classes = results["final"].get("teacher_accuracy_mean"), len(label_names(str(results["scenario"].get("dataset"))))
    if teacher is None or not classes or teacher >= 2.0 / classes:
        return None
    return (f"warning: the teachers' mean accuracy {teacher:.4f} is under twice chance ({1.0 / classes:.2f} for {classes} "
            "classes): their local training is too short or ill-suited to this data set (local-epochs, local-min-steps for "
            "small institutions, teacher-lr, teacher-models); start from a scenario made for it (fedstill scenarios)")
