"""An institution's checks before its SuperNode dials the SuperLink, each failure named with its fix.

`flower-supernode` retries forever on a TLS or authentication failure and logs a gRPC status code;
an institution's operator needs to hear instead which of its files is wrong. `check_superlink` makes
the same TLS handshake the SuperNode will make (the CA it was given, the host name it dials) and
explains why it failed; `check_auth_key` reads the node-authentication key the way Flower does;
`check_node_config` parses the node config as the ClientApp will (common.node_config.NodeConfig)
and checks that the files it names are there; `check_site_policy` reads the institution's site policy
where its node will (a policy that does not parse would refuse every message of every run).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.errors import ConfigError
from common.node_config import NodeConfig, UserConfigValue

HANDSHAKE_TIMEOUT_S = 10.0
HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
IP_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--superlink {address!r} is not host:port; for example superlink.example.org:8000")
    return host.strip("[]"), int(port)


def check_ca_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"root certificates {path} not found; copy the federation's ca.crt from the coordinator "
                          "(`fedstill certs` wrote it next to superlink.crt)")
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ConfigError(f"{path} holds no PEM certificate; give the coordinator's ca.crt "
                          "(it begins with -----BEGIN CERTIFICATE-----)") from None


def check_superlink(address: str, ca_file: Path, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Complete a TLS handshake with the SuperLink at `address`, trusting only `ca_file`; raise a
    ConfigError that says what is wrong (nothing listening, another CA, a name the certificate lacks)."""
    host, port = split_address(address)
    check_ca_file(ca_file)
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as error:
        if error.verify_code in (HOSTNAME_MISMATCH, IP_MISMATCH):
            raise ConfigError(
                f"the SuperLink at {address} presented a certificate that does not name {host!r}: dial the SuperLink "
                f"by a name in its certificate, or ask the coordinator to reissue it with `fedstill certs --host {host}`"
            ) from None
        raise ConfigError(
            f"the SuperLink at {address} presented a certificate that {ca_file} does not vouch for "
            f"({error.verify_message}): this node was given the wrong CA; get the federation's ca.crt from the "
            "coordinator (or you are not talking to the federation's SuperLink)"
        ) from None
    except ssl.SSLError as error:
        raise ConfigError(f"TLS handshake with {address} failed ({error.reason or error}): is it the SuperLink's "
                          "port, and does the SuperLink run with TLS (--ssl-certfile ...)?") from None
    except ConnectionRefusedError:
        raise ConfigError(f"nothing accepts connections at {address}: check that the SuperLink runs, the host and "
                          "port (flower-superlink --port, default 8000), and that the firewall lets this node in") from None
    except TimeoutError:
        raise ConfigError(f"no answer from {address} within {timeout_s:.0f} s: check the address and the "
                          "firewall between this node and the SuperLink") from None
    except socket.gaierror:
        raise ConfigError(f"cannot resolve {host!r}: check the --superlink host name") from None
    except OSError as error:
        raise ConfigError(f"cannot reach {address}: {error.strerror or error}") from None


def check_auth_key(path: Path) -> None:
    """The node-authentication key: an EC private key in OpenSSH format, without passphrase."""
    if not path.is_file():
        raise ConfigError(f"node authentication key {path} not found; make one with "
                          f"`fedstill certs --out certs --node NAME` and send the coordinator only NAME.pub")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key ({error}); use the NAME.key that "
                          "`fedstill certs --node NAME` wrote (Flower cannot read encrypted node keys)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__.lstrip('_')}; Flower's node authentication needs an "
                          "elliptic-curve key: make one with `fedstill certs --node NAME`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:o}); `chmod 600 {path}`")


def parse_node_config(text: str) -> dict[str, UserConfigValue]:
    """`key="text" key2=3 key3=true` -> typed values, parsed exactly as flower-supernode parses them."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text]) if text.strip() else {}
    except (click.ClickException, ValueError):
        raise ConfigError(f"node config {text!r} is not a list of key=value (quote text: data-path=\"/data\"; "
                          "numbers and true/false bare)") from None


def check_node_config(config: Mapping[str, UserConfigValue]) -> NodeConfig:
    """The node config parses as the ClientApp will parse it, the files it names exist where the node will
    look (keys, data, ledgers' folders), and the data folder holds one of the known layouts (its labels and
    image sizes are checked when a run tells the node the dataset)."""
    node = NodeConfig.from_node_config(config)
    for key, value in (("signing-key", node.signing_key), ("data-path", node.data_path), ("public-dir", node.public_dir)):
        if value is not None and not Path(value).expanduser().exists():
            raise ConfigError(f"node config {key}={value!r}: no such file or folder on this machine")
    for key, value in (("release-log", node.release_log), ("privacy-ledger", node.privacy_ledger)):
        if value is not None and not Path(value).expanduser().parent.is_dir():
            raise ConfigError(f"node config {key}={value!r}: its folder does not exist; create it first")
    if node.data_path is not None:
        from common.tasks.institution_files import detect_format

        detect_format(Path(node.data_path).expanduser())  # a known layout (the run checks labels and sizes)
    return node


def check_site_policy(node: NodeConfig) -> str:
    """Read the site policy this node will enforce, as the ClientApp will (client.enforce.site_policy); a
    ConfigError names a bad key or value. Returns one line saying what the policy sets."""
    from client.enforce import site_policy
    from common.config import RunConfig, default_run_config

    policy = site_policy(RunConfig.from_run_config(default_run_config()), node)
    if not policy.written:
        return "no site policy (the defaults of docs/deployment.md, \"Site policy\")"
    return "site policy " + "; ".join(policy.line(key).removeprefix("site-policy: ") for key in sorted(policy.written))
