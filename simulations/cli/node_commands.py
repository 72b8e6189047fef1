"""`fedstill supernode`: an institution checks its node's files and TLS connection, then starts its SuperNode."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer
from rich.markup import escape

from common.errors import FedstillError
from simulations.cli.console import console, fail
from simulations.deploy.node_check import check_auth_key, check_node_config, check_superlink, parse_node_config


def supernode(
    superlink: str = typer.Option(..., "--superlink", help="host:port of the federation's SuperLink."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="The federation's ca.crt, from the coordinator."),
    auth_key: Path = typer.Option(..., "--auth-supernode-private-key", help="This institution's node key (certs/nodes/NAME.key)."),
    node_config: str = typer.Option(
        "", "--node-config", help="institution-id=\"..\" signing-key=\"..\" data-path=\"..\" ... (see docs/deployment.md)."),
    port: int = typer.Option(9094, "--port", help="Local port of the node's ClientApp API (distinct per node on one host)."),
    max_retries: int = typer.Option(
        -1, "--max-retries", help="Give up after this many reconnection attempts (-1: Flower's default, retry forever)."),
    check_only: bool = typer.Option(False, "--check-only", help="Run the checks and exit without starting the node."),
) -> None:
    """Check this institution's files and its TLS connection to the SuperLink, then start its SuperNode."""
    try:
        check_auth_key(auth_key)
        config = parse_node_config(node_config)
        check_node_config(config)
        check_superlink(superlink, root_certificates)
    except FedstillError as error:
        fail(error)
    console.print(f"checks passed: {escape(superlink)} presents a certificate from {escape(str(root_certificates))}; "
                  f"node key and node config ({', '.join(sorted(config)) or 'empty'}) readable")
    if check_only:
        return
    binary = Path(sys.executable).parent / "flower-supernode"
    command = [str(binary) if binary.exists() else (shutil.which("flower-supernode") or "flower-supernode"),
               "--superlink", superlink, "--root-certificates", str(root_certificates),
               "--auth-supernode-private-key", str(auth_key), "--node-config", node_config,
               "--port", str(port)]
    if max_retries >= 0:
        command += ["--max-retries", str(max_retries)]
    sys.stdout.flush()
    os.execv(command[0], command)
