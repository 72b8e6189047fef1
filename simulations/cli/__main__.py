"""`python -m simulations.cli`: the fedstill command line."""

from simulations.cli.main import app

app()
