"""The coordinator's checks before its SuperLink starts, and the `flower-superlink` command they guard.

Each check raises a ConfigError of one line that names the problem and the fix: the database's folder,
the port, the TLS files (present, matching, signed by ca.crt, the key owner-only), the CA key kept off
the SuperLink host, and the coordinator's signing key (encrypted, and opened by $FEDSTILL_KEY_PASSPHRASE,
which the SuperLink's ServerApps inherit to sign the audit ledger).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from common.audit.keys import PASSPHRASE_ENV, load_signer
from common.audit.kinds import COORDINATOR
from common.errors import ConfigError
from simulations.deploy.certs import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, check_bundle

WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}  # where flower-superexec connects back


@dataclass(frozen=True)
class SuperLinkPlan:
    """What `fedstill superlink` starts: absolute paths, checked."""

    certs: Path
    database: Path
    host: str
    port: int
    coordinator_key: Path | None = None

    def command(self) -> list[str]:
        """`flower-superlink` with TLS, node authentication, the database, and no run-time installs."""
        binary = Path(sys.executable).parent / "flower-superlink"
        return [
            str(binary) if binary.exists() else (shutil.which("flower-superlink") or "flower-superlink"),
            "--host", self.host, "--port", str(self.port),
            "--ssl-ca-certfile", str(self.certs / CA_CERT), "--ssl-certfile", str(self.certs / SERVER_CERT),
            "--ssl-keyfile", str(self.certs / SERVER_KEY), "--enable-supernode-auth",
            "--database", str(self.database), "--disable-runtime-dependency-installation",
        ]

    def environment(self) -> dict[str, str]:
        """This environment, with this Python's bin folder first on PATH: flower-superlink starts
        `flower-superexec` (and that starts `flwr-serverapp`) from PATH; and the ServerApp's settings
        (`serverapp_environment`)."""
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return serverapp_environment({**os.environ, "PATH": path})

    def summary(self) -> str:
        key = f"; coordinator key {self.coordinator_key} opens with ${PASSPHRASE_ENV}" if self.coordinator_key else ""
        return (f"database folder {self.database.parent} writable; port {self.port} free on {self.host}; "
                f"{self.certs / SERVER_CERT} signed by {CA_CERT} and matching {SERVER_KEY} (owner-only); "
                f"no {CA_KEY} beside them{key}")


SERVERAPP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def serverapp_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` with `SERVERAPP_ENV`'s settings where it has none: the SuperLink passes them to the ServerApps it starts.
    OpenMP's threads wait passively: the ServerApp distils beside the SuperLink, which answers every node's polls,
    and with both cores taken by torch's two threads each poll stalls one thread while the other spins at the next
    barrier (measured on 2 cores: the same distillation 10.1-10.9 s spinning, 6.0-6.3 s passive, 4.1-4.6 s in a
    simulation's process with nothing polling; docs/deployment.md)."""
    return {**SERVERAPP_ENV, **env}


def check_superlink(certs: Path, database: Path, host: str, port: int, coordinator_key: Path | None = None) -> SuperLinkPlan:
    """Run every check in order; the first problem raises a ConfigError naming its fix."""
    plan = SuperLinkPlan(certs.expanduser().resolve(), database.expanduser().resolve(), host, port,
                         coordinator_key.expanduser().resolve() if coordinator_key else None)
    check_database(plan.database)
    check_port(host, port)
    check_certs(plan.certs, host)
    if plan.coordinator_key:
        check_coordinator_key(plan.coordinator_key)
    return plan


def check_database(database: Path) -> None:
    folder = database.parent
    if database.is_dir():
        raise ConfigError(f"--database {database} is a folder; give the database file inside it, e.g. {database / 'superlink.db'}")
    if not folder.is_dir():
        raise ConfigError(f"the database's folder {folder} does not exist; create it: mkdir -p -m 700 {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"the database's folder {folder} is not writable by this user; chown it to the SuperLink's "
                          f"user, or choose another --database")
    if database.exists() and not os.access(database, os.R_OK | os.W_OK):
        raise ConfigError(f"the database {database} is not readable and writable by this user; chown it to the "
                          "SuperLink's user")


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (bound as the SuperLink would, so TIME_WAIT does not count)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"--host {host}: cannot resolve it ({error.strerror}); give an address of this host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} is already in use on {host}: another SuperLink? stop it, "
                                  f"or give this one another --port") from None
            if error.errno == errno.EACCES:
                raise ConfigError(f"port {port} on {host} needs privileges this user lacks; use a port above 1023") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}); give an address of this host") from None


def check_certs(certs: Path, host: str) -> None:
    if not certs.is_dir():
        raise ConfigError(f"--certs {certs} is not a folder; make it with `fedstill certs --ca-dir CADIR --out {certs} --host HOST`")
    if (certs / CA_KEY).exists():
        raise ConfigError(f"{certs / CA_KEY} lies beside the SuperLink's files: whoever takes this host could issue "
                          f"certificates; move ca.key off the SuperLink host: fedstill certs --ca-dir /root/fedstill-ca")
    problems = check_bundle(certs, hosts=[WILDCARD_LOOPBACK.get(host, host)])
    if problems:
        raise ConfigError("; ".join(problems))
    mode = stat.S_IMODE((certs / SERVER_KEY).stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{certs / SERVER_KEY} is readable by others (mode {mode:o}): chmod 600 {certs / SERVER_KEY}")


def check_coordinator_key(key: Path) -> None:
    """The key the ServerApps sign the ledger with: passphrase-encrypted, and opened by $FEDSTILL_KEY_PASSPHRASE."""
    if not key.is_file():
        raise ConfigError(f"--coordinator-key {key} not found; make it with `fedstill keygen coordinator "
                          f"--passphrase-env {PASSPHRASE_ENV} --out {key.parent}`")
    if b"ENCRYPTED PRIVATE KEY" not in key.read_bytes()[:64]:
        raise ConfigError(f"--coordinator-key {key} is not passphrase-protected; make an encrypted one with "
                          f"`fedstill keygen coordinator --passphrase-env {PASSPHRASE_ENV} --out NEWDIR` and give its .key")
    if not os.environ.get(PASSPHRASE_ENV):
        raise ConfigError(f"${PASSPHRASE_ENV} is not set: export {PASSPHRASE_ENV} (the passphrase of {key.name}) before "
                          "starting the SuperLink; its ServerApps sign the audit ledger with that key")
    try:
        load_signer(key, COORDINATOR)
    except ConfigError:
        raise ConfigError(f"--coordinator-key {key} does not open with ${PASSPHRASE_ENV}: export {PASSPHRASE_ENV} "
                          "with that key's passphrase") from None
