"""`fedstill certs`: the CA, SuperLink TLS certificate and SuperNode authentication keys of a real deployment."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import typer
from cryptography import x509
from rich.markup import escape

from common.audit.keys import check_name
from common.errors import ConfigError, FedstillError
from simulations.cli.console import console, fail
from simulations.deploy.certs import (
    CA_CERT,
    CA_KEY,
    LOOPBACK,
    NODES,
    SERVER_CERT,
    SERVER_KEY,
    host_names,
    make_ca,
    make_node_key,
    make_server_cert,
    refuse_existing,
    subject_alt_names,
    write_node_key,
    write_pem,
)

PORT = 8000  # flower-superlink's default --port


def certs(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for ca.crt, ca.key, superlink.crt, superlink.key and nodes/."),
    host: list[str] = typer.Option([], "--host", help="DNS name or IP address SuperNodes and the flwr CLI use to reach the "
                                   "SuperLink (repeatable); localhost, 127.0.0.1 and ::1 are always added."),
    node: list[str] = typer.Option([], "--node", help="Make an authentication key pair nodes/NAME.key + nodes/NAME.pub for "
                                   "this institution (repeatable)."),
    days: int = typer.Option(365, min=1, help="Validity of the CA and SuperLink certificates, in days."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files that already exist."),
    passphrase_env: str = typer.Option("", help="Encrypt ca.key with the passphrase in this environment variable (superlink.key "
                                       "and node keys stay plain: Flower cannot read encrypted ones)."),
) -> None:
    """Make a CA and SuperLink TLS certificate (--host), and SuperNode authentication keys (--node)."""
    try:
        written = _make(out, host, node, days, overwrite, _passphrase(passphrase_env))
    except FedstillError as error:
        fail(error)
    for path, note in written:
        console.print(f"wrote {escape(str(path))}{note}")
    _next_steps(out, node)


def _passphrase(variable: str) -> bytes | None:
    if not variable:
        return None
    if not os.environ.get(variable):
        raise ConfigError(f"--passphrase-env {variable}: that environment variable is empty or unset")
    return os.environ[variable].encode("utf-8")


def _make(out: Path, hosts: list[str], nodes: list[str], days: int, overwrite: bool,
          passphrase: bytes | None) -> list[tuple[Path, str]]:
    """Check everything first, then write; returns (path, note) for each file written."""
    if not hosts and not nodes:
        raise ConfigError("nothing to make: give --host HOST for the CA and SuperLink certificate, "
                          "and/or --node NAME for SuperNode keys")
    names = [check_name(n) for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"--node names repeat ({', '.join(names)}); give each institution once")
    if not hosts and not (out / CA_CERT).is_file():
        raise ConfigError(f"{out / CA_CERT} not found: create the CA first with `fedstill certs --out {out} --host HOST`")
    if hosts:
        host_names(hosts)  # validate before writing anything
    targets = [out / NODES / f"{n}.{ext}" for n in names for ext in ("key", "pub")]
    targets += [out / f for f in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)] if hosts else []
    refuse_existing(targets, overwrite)
    written: list[tuple[Path, str]] = []
    if hosts:
        ca_key, ca_cert = make_ca("fedstill CA", days)
        key, cert = make_server_cert(ca_key, ca_cert, hosts, days)
        written += [
            (write_pem(out / CA_CERT, ca_cert, overwrite=overwrite), " (give to every SuperNode and flwr CLI user)"),
            (write_pem(out / CA_KEY, ca_key, private=True, passphrase=passphrase, overwrite=overwrite),
             f" (mode 0600{', encrypted' if passphrase else ''}; keep it offline, it can impersonate the SuperLink)"),
            (write_pem(out / SERVER_CERT, cert, overwrite=overwrite), f" (names {', '.join(subject_alt_names(cert))})"),
            (write_pem(out / SERVER_KEY, key, private=True, overwrite=overwrite), " (mode 0600, SuperLink host only)"),
        ]
    for name in names:
        private, public = write_node_key(make_node_key(), out / NODES, name, overwrite=overwrite)
        written += [(private, f" (mode 0600, for institution {name} only)"), (public, " (register with flwr)")]
    return written


def _superlink_address(out: Path) -> str:
    """host:port SuperNodes dial: the first name in superlink.crt that is not a loopback one."""
    try:
        names = subject_alt_names(x509.load_pem_x509_certificate((out / SERVER_CERT).read_bytes()))
    except (OSError, ValueError):
        names = []
    host = next((n for n in names if n not in LOOPBACK), "SUPERLINK-HOST")
    try:
        return f"[{host}]:{PORT}" if ipaddress.ip_address(host).version == 6 else f"{host}:{PORT}"
    except ValueError:
        return f"{host}:{PORT}"


def _next_steps(out: Path, nodes: list[str]) -> None:
    address = _superlink_address(out)
    ca = escape(str(out / CA_CERT))
    console.print(f"\n[bold]SuperLink[/] (its certificate also names {', '.join(LOOPBACK)}: "
                  "the ServerApp subprocess connects back over loopback):")
    console.print(f"  flower-superlink --host 127.0.0.1 --ssl-ca-certfile {ca} --ssl-certfile {escape(str(out / SERVER_CERT))} "
                  f"--ssl-keyfile {escape(str(out / SERVER_KEY))} --enable-supernode-auth")
    console.print("  its one port also serves the Control API (no login): open only /v1/fleet/ to the institutions, "
                  "through a reverse proxy (docs/deployment.md, \"Control API\")")
    console.print(f"[bold]flwr CLI[/]: in $FLWR_HOME/config.toml, {escape('[superlink.remote]')} address = \"{address}\", "
                  f"root-certificates = \"{escape(str(out.resolve() / CA_CERT))}\"")
    for name in nodes:
        key = escape(str(out / NODES / f"{name}.key"))
        console.print(f"[bold]{escape(name)}[/]: register, then start the node with a copy of ca.crt and its key:")
        console.print(f"  flwr supernode register {escape(str(out / NODES / f'{name}.pub'))} remote --name {escape(name)}")
        console.print(f"  fedstill supernode --superlink {address} --root-certificates {ca} --auth-supernode-private-key {key} "
                      "--approved-apps approved-apps.toml  # the app hashes it approves: fedstill app-hash APP")
