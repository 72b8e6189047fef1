"""The coordinator's commands: `fedstill superlink` (checks, then starts the SuperLink), `register` (an
institution's node key), `nodes` (who is registered, under which name and key) and `run` (submit a run, wait
for it, and report its results or the ServerApp's own error)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from common.errors import ConfigError, FedstillError
from simulations.cli.console import console, fail

if TYPE_CHECKING:
    from simulations.deploy.coordinator import Control, RunOutcome
    from simulations.deploy.deployed_config import DeployedConfig
    from simulations.deploy.federation_nodes import NodeEntry

POLL_S = 2.0  # between two looks at a running run's progress file; `flwr list` polls back off from it (Control.wait)
FORMATS = ("table", "json")


def superlink(
    certs: Path = typer.Option(..., "--certs", help="Folder with ca.crt, superlink.crt and superlink.key (not ca.key)."),
    database: Path = typer.Option(..., "--database", help="The SuperLink's state file, e.g. /var/lib/fedstill/superlink.db."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="The one port of the Fleet, Control and Runtime APIs."),
    coordinator_key: Path = typer.Option(None, "--coordinator-key", help="The coordinator's encrypted signing key: "
                                         "checked to open with $FEDSTILL_KEY_PASSPHRASE, which the ServerApps inherit."),
    check_only: bool = typer.Option(False, "--check-only", help="Run the checks and exit without starting the SuperLink."),
) -> None:
    """Check the SuperLink's files, port and keys, then start flower-superlink with TLS and node authentication."""
    from simulations.deploy.superlink_check import check_superlink

    try:
        plan = check_superlink(certs, database, host, port, coordinator_key)
    except FedstillError as error:
        fail(error)
    console.print(f"checks passed: {escape(plan.summary())}")
    if check_only:
        return
    command = plan.command()
    console.print(f"starting: {escape(' '.join(command))}")
    sys.stdout.flush()
    os.umask(0o077)  # superlink.db and everything the SuperLink writes: owner-only
    os.execve(command[0], command, plan.environment())


def register(
    name: str = typer.Argument(..., help="The institution's name (its node is listed under it)."),
    nodepub: Path = typer.Argument(..., help="The node key the institution sent: keys/NAME-node.pub."),
    federation: str = typer.Option(..., "--federation", help="The SuperLink connection in $FLWR_HOME/config.toml."),
) -> None:
    """Register an institution's node key with the SuperLink, so that its SuperNode may connect."""
    from common.audit.keys import check_name
    from simulations.deploy.federation_nodes import check_node_public_key, fingerprint, register_node

    try:
        key = check_node_public_key(nodepub, check_name(name))
        registration = register_node(_control(federation), nodepub, name)
    except FedstillError as error:
        fail(error)
    fp = fingerprint(key)
    if registration.already:
        known = _node_with(federation, fp)
        where = f" as node {known.node_id} (name {escape(known.name)})" if known else ""
        console.print(f"{escape(name)}'s node key (fingerprint {fp}) is already registered{where}; nothing to do")
        return
    console.print(f"registered {escape(name)}'s node key (fingerprint {fp}) as node {registration.node_id}")


def nodes(
    federation: str = typer.Option(..., "--federation", help="The SuperLink connection in $FLWR_HOME/config.toml."),
    allow_list: Path = typer.Option(None, "--allow-list", help="Also say whether each name is in this allow-list."),
    output_format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """The registered SuperNodes: node id, name, status and node-key fingerprint."""
    from common.audit.keys import load_allow_list
    from simulations.deploy.federation_nodes import list_nodes

    try:
        if output_format not in FORMATS:
            raise ConfigError(f"--format {output_format!r}: give table or json")
        listed = set(load_allow_list(allow_list)) if allow_list else None
        entries = list_nodes(federation)
    except FedstillError as error:
        fail(error)
    missing = sorted(listed - {e.name for e in entries}) if listed is not None else []
    if output_format == "json":
        rows = [{**e.to_json(), **({"allow-listed": e.name in listed} if listed is not None else {})} for e in entries]
        typer.echo(json.dumps({"federation": federation, "nodes": rows,
                               **({"allow-listed-not-registered": missing} if listed is not None else {})}, indent=2))
        return
    console.print(_nodes_table(entries, listed), soft_wrap=False)
    if missing:
        console.print(f"in the allow-list but not registered: {escape(', '.join(missing))}")


def run(
    scenario: str = typer.Argument(None, help="Scenario name (see `fedstill scenarios`) or a .toml file of run-config keys."),
    federation: str = typer.Option(..., "--federation", help="The SuperLink connection in $FLWR_HOME/config.toml."),
    run_config: Path = typer.Option(None, "--run-config", help="A .toml file of run-config keys (over the scenario)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a run-config key: --set num-server-rounds=3 (repeatable)."),
    app: Path = typer.Option(None, "--app", help="The app folder `flwr run` submits (default: this fedstill checkout)."),
    write_config: Path = typer.Option(None, "--write-config", help="Write the run config here, print the flwr run command, exit."),
    timeout: float = typer.Option(0, "--timeout", help="Stop waiting after this many seconds (0: no limit); the run goes on."),
) -> None:
    """Submit a run to the federation, wait for it, and print its results (or the ServerApp's own error)."""
    from simulations.cli.run_commands import preflight
    from simulations.deploy.deployed_config import resolve_deployed
    from simulations.launcher import PROJECT_DIR

    app_dir = (app or PROJECT_DIR).expanduser().resolve()
    try:
        deployed = resolve_deployed(scenario, run_config, set_, Path.cwd())
        for note in deployed.notes:
            console.print(escape(note))
        _preflight_deployed(deployed)
        preflight(deployed.cfg)
        if write_config is not None:
            _write_config(deployed, write_config, app_dir, federation)
            return
        control = _control(federation)
        run_id = _submit(control, deployed, app_dir)
    except FedstillError as error:
        fail(error)
    _follow(control, deployed, run_id, timeout)


def _control(federation: str) -> Control:
    """The coordinator's side of `federation`, through this environment's flwr CLI."""
    from simulations.deploy.coordinator import Control, flwr_cli

    return Control(federation, flwr_cli())


def _node_with(federation: str, fp: str) -> NodeEntry | None:
    """The registered node whose key has fingerprint `fp`, when the SuperLink lists it."""
    from simulations.deploy.federation_nodes import list_nodes

    try:
        return next((e for e in list_nodes(federation) if e.fingerprint == fp), None)
    except FedstillError:
        return None


def _nodes_table(entries: list[NodeEntry], listed: set[str] | None) -> Table:
    table = Table(title="SuperNodes")
    for column in ("node id", "name", "status", "node-key fingerprint", *(("allow-listed",) if listed is not None else ())):
        table.add_column(column)
    for entry in entries:
        extra = ("yes" if entry.name in listed else "[red]no[/]",) if listed is not None else ()
        table.add_row(str(entry.node_id), escape(entry.name), entry.status, entry.fingerprint, *extra)
    return table


def _preflight_deployed(deployed: DeployedConfig) -> None:
    """What the ServerApp would refuse at once, and a run folder holding an earlier run's results (the ServerApp
    would start afresh over a completed run), refused here before anything is submitted."""
    from server.audit_trail import check_coordinator_key
    from server.results.run_folder import resolve_run_dir
    from simulations.launcher import earlier_status, taken_run_folder

    run_dir = resolve_run_dir(deployed.cfg)
    check_coordinator_key(deployed.cfg, run_dir)
    if (earlier := earlier_status(run_dir)) is not None and not deployed.cfg.resume:
        raise ConfigError(taken_run_folder(run_dir, earlier))


def _write_config(deployed: DeployedConfig, out: Path, app: Path, federation: str) -> None:
    from common.files import atomic_write_text

    atomic_write_text(out, deployed.toml(), mode=0o600)
    console.print(f"wrote {escape(str(out))} ({len(deployed.values)} keys)")
    console.print(f"flwr run {escape(str(app))} {escape(federation)} --run-config {escape(str(out.resolve()))}")


def _submit(control: Control, deployed: DeployedConfig, app: Path) -> str:
    from server.results.run_folder import resolve_run_dir

    handle, name = tempfile.mkstemp(prefix="fedstill-run-", suffix=".toml")  # 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(deployed.toml())
        run_id = control.submit(app, Path(name))
    finally:
        os.unlink(name)
    cfg = deployed.cfg
    console.print(f"run {run_id} submitted to {escape(control.federation)}: {escape(cfg.scenario)}, {cfg.num_clients} "
                  f"institutions, {cfg.num_server_rounds} rounds -> {escape(str(resolve_run_dir(cfg)))}")
    return run_id


def _follow(control: Control, deployed: DeployedConfig, run_id: str, timeout: float) -> None:
    """Wait with round lines from the run's progress file; then the results, or the reason and exit 1."""
    from server.results.run_folder import PROGRESS, resolve_run_dir
    from simulations.deploy.coordinator import ProgressFollower

    run_dir = resolve_run_dir(deployed.cfg)
    follower = ProgressFollower(run_dir / PROGRESS)

    def show() -> bool:
        for event in follower.new_events():
            _show_event(event, deployed.cfg.num_server_rounds)
        return follower.finished is not None

    try:
        status = control.wait(run_id, timeout or None, poll_s=POLL_S, on_poll=show, between=show)
        outcome = control.outcome(run_id, status, follower.finished.get("error") if follower.finished else None)
    except KeyboardInterrupt:
        console.print(f"the run goes on; stop it with `flwr stop {run_id} {escape(control.federation)}`")
        raise typer.Exit(code=130) from None
    except FedstillError as error:
        fail(error)
    _report(outcome, run_dir)


def _show_event(event: dict[str, Any], rounds: int) -> None:
    kind = event.get("event")
    if kind == "nodes":
        console.print(f"{event.get('count')} nodes connected")
    elif kind == "round":
        console.print(f"round {event.get('round')}/{rounds}: student accuracy {event.get('student_accuracy', 0):.4f}, "
                      f"{event.get('clients_replied')} replies, {event.get('wall_s', 0):.1f} s")


def _report(outcome: RunOutcome, run_dir: Path) -> None:
    from server.results.run_folder import RESULTS
    from simulations.cli.run_commands import print_results
    from simulations.launcher import RunFailed

    if outcome.completed:
        try:
            results = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            console.print(f"run {outcome.run_id} completed; its results are in {escape(str(run_dir))} on the SuperLink's "
                          f"host ({escape(type(error).__name__)} reading them here)")
            return
        print_results(results, run_dir)
        return
    if outcome.status.endswith(":stopped"):
        fail(RunFailed(f"run {outcome.run_id} was stopped"))
    if outcome.error:
        fail(RunFailed(f"run {outcome.run_id} failed: {outcome.error}"))
    fail(RunFailed(f"run {outcome.run_id} ended {outcome.status}"))
