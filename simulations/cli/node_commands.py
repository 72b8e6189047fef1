"""`fedstill supernode`: an institution checks its node's files and TLS connection, then starts its SuperNode
beside the runner that starts only approved apps; `fedstill app-hash`: the hash an institution approves."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import typer
from rich.markup import escape

from common.errors import ConfigError, FedstillError
from simulations.cli.console import console, fail
from simulations.deploy.approved_apps import ApprovedApps, app_fab, approve, fab_hash
from simulations.deploy.node_check import (
    check_auth_key,
    check_node_config,
    check_port,
    check_site_policy,
    check_superlink,
    parse_node_config,
)


def supernode(
    superlink: str = typer.Option(..., "--superlink", help="host:port of the federation's SuperLink."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="The federation's ca.crt, from the coordinator."),
    auth_key: Path = typer.Option(..., "--auth-supernode-private-key", help="This institution's node key (keys/NAME-node.key)."),
    node_config: str = typer.Option(
        "", "--node-config", help="The node-config.toml `fedstill institution-init` wrote, or key=value text: "
        "institution-id=\"..\" signing-key=\"..\" data-path=\"..\" ... (absolute paths; see docs/deployment.md)."),
    approved_apps: Path = typer.Option(
        ..., "--approved-apps", help="The app bundles (FAB sha256) this institution lets run here; see `fedstill app-hash`."),
    port: int = typer.Option(9094, "--port", min=1, max=65535,
                             help="Local port of the node's ClientApp API on 127.0.0.1 (distinct per node on one host)."),
    max_retries: int = typer.Option(
        -1, "--max-retries", help="Give up after this many reconnection attempts (-1: Flower's default, retry forever)."),
    check_only: bool = typer.Option(False, "--check-only", help="Run the checks and exit without starting the node."),
    poll_interval: float = typer.Option(
        0.5, "--poll-interval", min=0.05, max=3.0,
        help="Seconds between the node's requests for new messages to the SuperLink (Flower's own: 3)."),
) -> None:
    """Check this institution's files and its TLS connection to the SuperLink, then start its SuperNode."""
    try:  # the checks on this machine first, the SuperLink last
        check_port(port)
        check_auth_key(auth_key)
        config = parse_node_config(node_config)
        policy = check_site_policy(check_node_config(config))
        approved = ApprovedApps.load(approved_apps)
        check_superlink(superlink, root_certificates)
    except FedstillError as error:
        fail(error)
    console.print(f"checks passed: {escape(superlink)} presents a certificate from {escape(str(root_certificates))}; "
                  f"port {port} free; node key and node config ({', '.join(sorted(config)) or 'empty'}) readable; "
                  f"{len(approved.sha256)} approved app bundle(s); {escape(policy)}")
    if check_only:
        return
    # Flower's flower-supernode, run by simulations.deploy.supernode_poll so that it polls every `poll_interval` s
    command = [sys.executable, "-m", "simulations.deploy.supernode_poll", "--poll-interval", str(poll_interval), "--",
               "--superlink", superlink, "--root-certificates", str(root_certificates),
               "--auth-supernode-private-key", str(auth_key), "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(port), "--isolation", "process"]
    if max_retries >= 0:
        command += ["--max-retries", str(max_retries)]
    sys.stdout.flush()
    # The runner watches this PID, which stays the SuperNode's after exec; it stops when the node stops.
    subprocess.Popen([sys.executable, "-m", "simulations.deploy.runner", "dispatch",  # noqa: S603
                      "--runtime-api-address", f"127.0.0.1:{port}", "--approved-apps", str(approved_apps.resolve()),
                      "--parent-pid", str(os.getpid())])
    os.execv(command[0], command)


def app_hash(
    app_dir: Path = typer.Argument(Path("."), help="An app folder (with its pyproject.toml), as given to `flwr run`."),
    approve_file: Path = typer.Option(None, "--approve", help="Also add the hash to this approved-apps.toml (created if absent), "
                                      "the file `fedstill supernode --approved-apps` reads."),
) -> None:
    """Print the app bundle hash (FAB sha256) that `flwr run APP_DIR` submits: the line an institution approves."""
    if approve_file is not None and app_dir.resolve() in approve_file.resolve().parents:
        fail(ConfigError(f"--approve {approve_file} is inside {app_dir}: the bundle would include it and change; "
                         "keep the approved-apps file outside the app folder"))
    try:
        digest = fab_hash(app_fab(app_dir))
    except (OSError, ValueError) as error:
        fail(FedstillError(f"cannot build the app bundle of {app_dir}: {error}"))
    console.print(digest, highlight=False)
    if approve_file is None:
        return
    try:
        added = approve(approve_file, digest, note=f"{app_dir.resolve().name}, approved {date.today().isoformat()}")
    except FedstillError as error:
        fail(error)
    where = escape(str(approve_file))
    console.print(f"added it to {where}" if added else f"{where} approves it already; nothing changed", highlight=False)
