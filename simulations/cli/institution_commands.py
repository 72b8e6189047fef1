"""`fedstill institution-init`: an institution makes its own keys, folders and node config, and learns what to exchange."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from common.errors import FedstillError
from simulations.cli.console import console, fail
from simulations.deploy.institution import InstitutionFolder, init_institution


def institution_init(
    name: str = typer.Argument(..., help="Institution id (its name in the allow-list): letters, digits, '.', '_', '-'."),
    out: Path = typer.Option(..., "--out", "-o", help="The institution's folder (made absolute; created mode 0700)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace keys and node-config.toml that already exist."),
) -> None:
    """Make an institution's signing and node key pairs, data/ and state/ folders and node-config.toml."""
    try:
        folder = init_institution(name, out, overwrite)
    except FedstillError as error:
        fail(error)
    for path, note in ((folder.signing_key, "signing key, mode 0600"), (folder.signing_public, "its public key"),
                       (folder.node_key, "node key, mode 0600"), (folder.node_public, "its public key"),
                       (folder.node_config_path, "node config")):
        console.print(f"wrote {escape(str(path))} ({note})")
    _next_steps(folder)


def _next_steps(folder: InstitutionFolder) -> None:
    root = folder.root
    console.print(f"\nput this institution's private data in {escape(str(root / 'data'))}; it never leaves this machine")
    console.print("[bold]Send the coordinator[/] (public files only):")
    console.print(f"  {escape(str(folder.signing_public))}  signing key, for the allow-list")
    console.print(f"  {escape(str(folder.node_public))}  node key, to register")
    console.print(f"[bold]Receive from the coordinator[/], into {escape(str(root))}: ca.crt, allow-list.toml, coordinator.pub")
    console.print("[bold]Approve the app[/] you reviewed, then start the node:")
    console.print(f"  fedstill app-hash APP_DIR --approve {escape(str(root / 'approved-apps.toml'))}")
    console.print(f"  fedstill supernode --superlink SUPERLINK-HOST:8000 --root-certificates {escape(str(root / 'ca.crt'))} "
                  f"--auth-supernode-private-key {escape(str(folder.node_key))} "
                  f"--approved-apps {escape(str(root / 'approved-apps.toml'))} "
                  f"--node-config {escape(str(folder.node_config_path))} --port 9094")
