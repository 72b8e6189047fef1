"""`fedstill site-data`: write each institution's partition of a scenario as its own data folder and show
what each received."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from common.errors import FedstillError
from simulations.cli.console import console, fail
from simulations.deploy.site_data import WrittenSite, write_site_data

if TYPE_CHECKING:
    from common.config import RunConfig


def site_data(
    scenario: str = typer.Argument(None, help="Scenario name (see `fedstill scenarios`) or a .toml file of run-config keys."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for institution-<i>/data/ (one per institution)."),
    format_: str = typer.Option("idx", "--format", "-f", help="idx (train-images/labels idx files) or images (class folders of PNGs)."),
    num_clients: int = typer.Option(0, min=0, help="Number of institutions (0: the scenario's num-clients)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a run-config key: --set partitioner=dirichlet (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace data folders that already hold data."),
) -> None:
    """Write each institution's partition of a scenario as its own data folder (for demos, tests and deployment)."""
    from simulations.scenarios import resolve

    try:
        # --num-clients may go below the scenario's quorum (min-clients), which does not matter here
        sets = list(set_) + ([f"num-clients={num_clients}", "min-clients=1"] if num_clients else [])
        _, cfg = resolve(scenario, sets, Path.cwd())
        written, fingerprint = write_site_data(cfg, out, format_, overwrite)
    except FedstillError as error:
        fail(error)
    _report(cfg, written, fingerprint, format_)


def _report(cfg: RunConfig, written: list[WrittenSite], fingerprint: str, fmt: str) -> None:
    table = Table(title=f"{cfg.scenario}: {len(written)} institutions, {cfg.partitioner}, {fmt}")
    table.add_column("institution", no_wrap=True)
    table.add_column("samples", justify="right")
    for label in range(len(written[0].class_counts)):
        table.add_column(str(label), justify="right")
    for site in written:
        table.add_row(site.name, str(int(site.class_counts.sum())), *(str(int(c)) for c in site.class_counts))
    console.print(table)
    console.print("samples per class (columns: class index); written to:")
    for site in written:
        console.print(f"  {escape(str(site.folder.resolve()))}")
    console.print(f"public set: {cfg.dataset}, public-size {cfg.public_size}, seed {cfg.seed}, fingerprint {fingerprint[:16]}...")
    first = escape(str(written[0].folder.resolve()))
    console.print(f"deployment: flower-supernode ... --node-config 'data-path=\"{first}\"' (one folder per institution)")
    console.print("simulation: with --set sites-dir=<--out folder>, each institution reads its data/ folder "
                  "(its keys must be beside it: see docs/deployment.md, Institution data)")
