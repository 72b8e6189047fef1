"""The `fedstill` app: every command of simulations/cli/ registered on one Typer app, in the order `--help` lists them."""

from __future__ import annotations

import typer

from simulations.cli.allow_list_commands import allow_list_app
from simulations.cli.audit_commands import audit_app, keygen
from simulations.cli.certs_commands import certs
from simulations.cli.federation_commands import nodes, register, run, superlink
from simulations.cli.institution_commands import institution_init
from simulations.cli.node_commands import app_hash, supernode
from simulations.cli.run_commands import compare, privacy_sweep, scenarios, simulate
from simulations.cli.site_commands import site_data
from simulations.cli.student_commands import bench, evaluate, export

app = typer.Typer(help="fedstill: federated knowledge distillation on Flower.", no_args_is_help=True, add_completion=False)
app.command("institution-init")(institution_init)
app.command()(keygen)
app.command()(certs)
app.add_typer(allow_list_app, name="allow-list")
app.command("site-data")(site_data)
app.command()(supernode)
app.command("app-hash")(app_hash)
app.command()(superlink)
app.command()(register)
app.command()(nodes)
app.command()(run)
app.command()(export)
app.command()(evaluate)
app.command()(bench)
app.add_typer(audit_app, name="audit")
app.command()(simulate)
app.command()(compare)
app.command("privacy-sweep")(privacy_sweep)
app.command()(scenarios)


@app.callback()
def main() -> None:
    """fedstill: institutions share soft labels on a public set; the server distils a student."""


if __name__ == "__main__":
    app()
