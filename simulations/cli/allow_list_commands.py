"""`fedstill allow-list add|show`: the coordinator lists the institutions whose signed releases it accepts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from common.audit.allow_list import add_institution, listed, read_signing_public
from common.audit.keys import key_id
from common.errors import FedstillError
from simulations.cli.console import console, fail

allow_list_app = typer.Typer(help="The allow-list: institutions' signing keys the coordinator accepts.", no_args_is_help=True)


@allow_list_app.command()
def add(
    name: str = typer.Argument(..., help="Institution id, as in its node config's institution-id."),
    pubfile: Path = typer.Argument(..., help="The institution's signing public key, keys/NAME.pub (one \"ed25519:...\" line)."),
    allow_list: Path = typer.Option(..., "--allow-list", help="The allow-list TOML (created if absent)."),
) -> None:
    """Add an institution's signing public key to the allow-list."""
    try:
        public = read_signing_public(pubfile, name)
        added = add_institution(allow_list, name, public)
    except FedstillError as error:
        fail(error)
    where = escape(str(allow_list))
    if added:
        console.print(f"added {escape(name)} (key {key_id(public)}) to {where}")
    else:
        console.print(f"{where} lists {escape(name)} with this key already (key {key_id(public)}); nothing changed")


@allow_list_app.command()
def show(
    allow_list: Path = typer.Option(..., "--allow-list", help="The allow-list TOML."),
) -> None:
    """Print each institution of the allow-list with its key id."""
    try:
        entries = listed(allow_list)
    except FedstillError as error:
        fail(error)
    width = max(len(name) for name, _ in entries)
    width = max(width, len("name"))
    console.print(f"{escape(str(allow_list))}: {len(entries)} institution(s)")
    console.print(f"  {'name':<{width}}  key id", highlight=False)
    for name, identifier in entries:
        console.print(f"  {escape(name):<{width}}  {identifier}", highlight=False)
