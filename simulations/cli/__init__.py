"""The `fedstill` command line: one Typer app (main.py), its command groups, one console and error handler."""
