"""`fedstill certs`: the SuperLink's TLS certificate from a CA kept apart (coordinator), or a node key (institution)."""

from __future__ import annotations

import datetime as dt
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
    load_ca,
    make_ca,
    make_node_key,
    make_server_cert,
    refuse_existing,
    subject_alt_names,
    write_node_key,
    write_pem,
)

PORT = 8000  # flower-superlink's default --port
DATABASE = "/var/lib/fedstill/superlink.db"
KEEP_APART = "keep the CA key apart from the SuperLink's files: --ca-dir /root/fedstill-ca"


def certs(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for superlink.crt, superlink.key, a copy of ca.crt and nodes/ "
                             "(coordinator), or for nodes/NAME.key and NAME.pub (institution)."),
    ca_dir: Path = typer.Option(None, "--ca-dir", help="Folder of the CA (ca.crt, ca.key): made when it holds none, reused "
                                "otherwise; keep it off the SuperLink host."),
    host: list[str] = typer.Option([], "--host", help="DNS name or IP address SuperNodes and the flwr CLI use to reach the "
                                   "SuperLink (repeatable; needs --ca-dir); localhost, 127.0.0.1 and ::1 are always added."),
    node: list[str] = typer.Option([], "--node", help="Make a node authentication key pair nodes/NAME.key + nodes/NAME.pub "
                                   "(repeatable); at an institution, `fedstill institution-init` makes it with the rest."),
    days: int = typer.Option(365, min=1, help="Validity of a new CA and of the SuperLink certificate, in days."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files in --out that already exist (a CA in --ca-dir "
                                   "is always reused)."),
    passphrase_env: str = typer.Option("", help="ca.key's passphrase is in this environment variable: a new ca.key is "
                                       "encrypted with it, an existing one opened with it (superlink.key and node keys stay plain: "
                                       "Flower cannot read encrypted ones)."),
) -> None:
    """Coordinator: the SuperLink's TLS certificate (--ca-dir, --host). Institution: its node key (--node, no CA)."""
    try:
        lines = _make(out, ca_dir, host, node, days, overwrite, _passphrase(passphrase_env))
    except FedstillError as error:
        fail(error)
    for line in lines:
        console.print(escape(line))
    if host or (out / SERVER_CERT).is_file():
        _coordinator_steps(out, ca_dir, node)
    else:
        _institution_steps(out, node)


def _passphrase(variable: str) -> bytes | None:
    if not variable:
        return None
    if not os.environ.get(variable):
        raise ConfigError(f"--passphrase-env {variable}: that environment variable is empty or unset")
    return os.environ[variable].encode("utf-8")


def _check_request(out: Path, ca_dir: Path | None, hosts: list[str], nodes: list[str]) -> list[str]:
    """The node names, once every combination of options that cannot work is refused (nothing written yet)."""
    if ca_dir is not None and not hosts:
        raise ConfigError("--ca-dir signs the SuperLink's certificate: give --host HOST as well "
                          "(a node key alone needs only --out DIR --node NAME)")
    if not hosts and not nodes:
        raise ConfigError("nothing to make: give --ca-dir CADIR --host HOST for the SuperLink's certificate (coordinator), "
                          "or --node NAME for this institution's node key")
    names = [check_name(n) for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"--node names repeat ({', '.join(names)}); give each institution once")
    if hosts and ca_dir is None:
        raise ConfigError(f"--host without --ca-dir: {KEEP_APART}")
    if ca_dir is not None:
        cas, certs_dir = ca_dir.expanduser().resolve(), out.expanduser().resolve()
        if cas == certs_dir or certs_dir in cas.parents:
            where = "is the --out folder" if cas == certs_dir else f"is inside --out {out}"
            raise ConfigError(f"--ca-dir {ca_dir} {where}: {KEEP_APART}")
        host_names(hosts)  # validate before writing anything
    return names


def _make(out: Path, ca_dir: Path | None, hosts: list[str], nodes: list[str], days: int, overwrite: bool,
          passphrase: bytes | None) -> list[str]:
    """Check everything first, then write; returns one line for each file written or reused."""
    names = _check_request(out, ca_dir, hosts, nodes)
    targets = [out / NODES / f"{n}.{ext}" for n in names for ext in ("key", "pub")]
    targets += [out / f for f in (CA_CERT, SERVER_CERT, SERVER_KEY)] if hosts else []
    refuse_existing(targets, overwrite)
    lines = _make_superlink(out, ca_dir, hosts, days, overwrite, passphrase) if ca_dir is not None else []
    for name in names:
        private, public = write_node_key(make_node_key(), out / NODES, name, overwrite=overwrite)
        lines += [f"wrote {private} (mode 0600, for institution {name} only)", f"wrote {public} (its node key to register)"]
    return lines


def _make_superlink(out: Path, ca_dir: Path, hosts: list[str], days: int, overwrite: bool,
                    passphrase: bytes | None) -> list[str]:
    """The CA in `ca_dir` (made when absent), then the SuperLink's certificate and key and a copy of ca.crt in `out`."""
    ca = load_ca(ca_dir, passphrase)
    if ca is None:
        ca = make_ca("fedstill CA", days)
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = [f"wrote {write_pem(ca_dir / CA_CERT, ca[1])} (the federation's CA certificate)",
                 f"wrote {write_pem(ca_dir / CA_KEY, ca[0], private=True, passphrase=passphrase)} "
                 f"(mode 0600{', encrypted' if passphrase else ''}; keep it here, off the SuperLink host: "
                 "it can impersonate the SuperLink)"]
    else:
        lines = [f"reused the CA in {ca_dir} ({CA_CERT}, {CA_KEY})"]
    key, cert = make_server_cert(*ca, hosts, days)
    if cert.not_valid_after_utc - ca[1].not_valid_after_utc > dt.timedelta(days=1):
        lines.append(f"note: the CA expires on {ca[1].not_valid_after_utc:%Y-%m-%d}, before the SuperLink certificate; "
                     "nodes refuse it from then on: make a new CA in an empty --ca-dir before that day")
    return lines + [
        f"wrote {write_pem(out / CA_CERT, ca[1], overwrite=overwrite)} (copy of {ca_dir / CA_CERT}: "
        "give to every SuperNode and flwr CLI user)",
        f"wrote {write_pem(out / SERVER_CERT, cert, overwrite=overwrite)} (names {', '.join(subject_alt_names(cert))})",
        f"wrote {write_pem(out / SERVER_KEY, key, private=True, overwrite=overwrite)} (mode 0600, SuperLink host only)",
    ]


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


def _coordinator_steps(out: Path, ca_dir: Path | None, nodes: list[str]) -> None:
    certs_dir, nodes_dir = escape(str(out)), escape(str(out / NODES))
    kept = f"; {escape(str(ca_dir / CA_KEY))} stays off it" if ca_dir is not None else ""
    console.print(f"\n[bold]SuperLink[/] (copy {certs_dir} to the SuperLink host{kept}):")
    console.print(f"  fedstill superlink --certs {certs_dir} --database {DATABASE}")
    console.print(f"  its certificate also names {', '.join(LOOPBACK)} (the ServerApp subprocess connects back over loopback); "
                  "its one port also serves the Control API (no login): open only /v1/fleet/ to the institutions, "
                  "through a reverse proxy (docs/deployment.md, \"Control API\")")
    console.print(f"[bold]flwr CLI[/]: in $FLWR_HOME/config.toml, {escape('[superlink.remote]')} address = "
                  f"\"{_superlink_address(out)}\", root-certificates = \"{escape(str(out.resolve() / CA_CERT))}\"")
    console.print(f"[bold]Institutions[/]: send each {escape(str(out / CA_CERT))}; each runs `fedstill institution-init NAME "
                  "--out DIR` and sends back keys/NAME.pub (signing key) and keys/NAME-node.pub (node key, save it as "
                  f"{nodes_dir}/NAME.pub):")
    console.print("  fedstill allow-list add NAME NAME.pub --allow-list allow-list.toml")
    for name in nodes or ["NAME"]:
        console.print(f"  fedstill register {escape(name)} {nodes_dir}/{escape(name)}.pub --federation remote")


def _institution_steps(out: Path, nodes: list[str]) -> None:
    console.print("\n[bold]At this institution[/]:")
    for name in nodes:
        console.print(f"  send {escape(str(out / NODES / f'{name}.pub'))} (the node key) to the coordinator, who registers "
                      f"it; {escape(name)}.key stays here (mode 0600)")
    console.print("  receive the federation's ca.crt and the SuperLink's address from the coordinator, then start the node:")
    for name in nodes:
        console.print(f"  fedstill supernode --superlink SUPERLINK-HOST:{PORT} --root-certificates ca.crt "
                      f"--auth-supernode-private-key {escape(str(out / NODES / f'{name}.key'))} "
                      "--approved-apps approved-apps.toml --node-config node-config.toml --port 9094")
    console.print("  `fedstill institution-init NAME --out DIR` makes this key together with the signing key and node config")
