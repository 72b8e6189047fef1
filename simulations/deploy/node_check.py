"""An institution's checks before its SuperNode dials the SuperLink, each failure named with its fix.

`flower-supernode` retries forever on a TLS or authentication failure and logs a gRPC status code;
an institution's operator needs to hear instead which of its files is wrong. `check_superlink` makes
the same TLS handshake the SuperNode will make (the CA it was given, the host name it dials) and
explains why it failed; `check_auth_key` reads the node-authentication key the way Flower does;
`check_port` finds the node's local port free; `check_node_config` parses the node config as the
ClientApp will (common.node_config.NodeConfig) and checks that the files it names are there, named
by absolute paths, and that its signing key is not the node key; `check_site_policy` reads the
institution's site policy where its node will (a policy that does not parse would refuse every
message of every run).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from common.errors import ConfigError
from common.node_config import NodeConfig, UserConfigValue

HANDSHAKE_TIMEOUT_S = 10.0
PATH_KEYS = ("signing-key", "release-log", "privacy-ledger", "state-dir", "data-path", "public-dir", "allow-list",
             "coordinator-key", "site-policy")  # node-config keys that name files or folders
OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
SIGNING_KEY_HINT = "keys/NAME.key (the Ed25519 signing key) is for the node config's signing-key"
NODE_KEY_HINT = "keys/NAME-node.key (the OpenSSH EC node key) is for --auth-supernode-private-key"
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
                f"by a name in its certificate, or ask the coordinator to reissue it with "
                f"`fedstill certs --ca-dir CADIR --out CERTS --host {host}`"
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
        raise ConfigError(f"node authentication key {path} not found; `fedstill institution-init NAME --out DIR` makes "
                          "DIR/keys/NAME-node.key (send the coordinator only NAME-node.pub)")
    data = path.read_bytes()
    if _is_signing_key(data):
        raise ConfigError(f"--auth-supernode-private-key {path} is a signing key (PEM), not a node key: {NODE_KEY_HINT}, "
                          f"{SIGNING_KEY_HINT}")
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key ({error}); use the node key "
                          "keys/NAME-node.key that `fedstill institution-init` wrote (Flower cannot read encrypted node keys)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__.lstrip('_')}; Flower's node authentication needs an "
                          f"elliptic-curve key: {NODE_KEY_HINT} (`fedstill institution-init` writes it)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:o}); `chmod 600 {path}`")


def _is_signing_key(data: bytes) -> bool:
    """Whether `data` is a PEM private key of the kind `fedstill keygen` writes (Ed25519 PKCS#8, maybe encrypted)."""
    if data.lstrip().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"):
        return True
    try:
        return isinstance(load_pem_private_key(data, password=None), ed25519.Ed25519PrivateKey)
    except (ValueError, TypeError):
        return False


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """The node's local port (`--port`) is free on `host`, as flower-supernode will need it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: a closing connection is no conflict
        try:
            sock.bind((host, port))
        except OverflowError:
            raise ConfigError(f"--port {port} is not a port number; give one from 1024 to 65535, e.g. --port 9094") from None
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port} is already in use on {host}: another SuperNode on this host? give each node "
                                  f"its own --port, e.g. --port {port + 1 if port < 65535 else 9095}") from None
            raise ConfigError(f"--port {port} cannot be used on {host} ({error.strerror or error}); "
                              "choose a port from 1024 to 65535, e.g. --port 9095") from None


def parse_node_config(text: str) -> dict[str, UserConfigValue]:
    """`key="text" key2=3 key3=true`, or the path of a .toml file, -> typed values, parsed exactly as flower-supernode
    parses them (a text ending in .toml is a file, its tables flattened to dotted keys)."""
    import click
    from flwr.common.config import parse_config_args

    if text.endswith(".toml"):
        path = Path(text).expanduser()
        if not path.is_file() and "=" in text:
            raise ConfigError(f"node config {text!r} ends with .toml, so it is read as a file name (as flower-supernode "
                              "reads it); quote the value: key=\"/path/file.toml\"")
        if not path.is_file():
            raise ConfigError(f"node config file {path} not found; give the node-config.toml `fedstill institution-init` wrote")
        try:
            return parse_config_args([text])
        except (OSError, ValueError) as error:
            raise ConfigError(f"node config file {path} is not flat TOML of text, numbers and true/false ({error}); "
                              "write one key = value per line, as `fedstill institution-init` does") from None
    try:
        return parse_config_args([text]) if text.strip() else {}
    except (click.ClickException, ValueError):
        raise ConfigError(f"node config {text!r} is not a list of key=value (quote text: data-path=\"/data\"; "
                          "numbers and true/false bare), or the path of a .toml file") from None


def check_absolute_paths(config: Mapping[str, UserConfigValue]) -> None:
    """Every file or folder the node config names is an absolute path (or starts with ~)."""
    for key in PATH_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value or (key == "coordinator-key" and value.startswith("ed25519:")):
            continue
        if not Path(value).expanduser().is_absolute():
            raise ConfigError(f"node config {key}={value!r} is a relative path; give the absolute path "
                              f"({Path(value).resolve()}?): a SuperNode under a service manager resolves relative paths "
                              "against its working directory")


def _check_signing_key_role(path: Path, name: str) -> None:
    """The node config's signing-key is not the node key (nor another EC key such as ca.key or superlink.key)."""
    try:
        data = path.read_bytes()
    except OSError:
        return  # not there: check_node_config said so already; unreadable: the node says so when it signs
    if data.lstrip().startswith(OPENSSH_PRIVATE):
        raise ConfigError(f"node config signing-key={str(path)!r} is the node key (OpenSSH): "
                          f"{NODE_KEY_HINT.replace('NAME', name)}; {SIGNING_KEY_HINT.replace('NAME', name)}")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return  # encrypted (read with $FEDSTILL_KEY_PASSPHRASE by the node) or not a key: the node says so when it signs
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        kind = "an EC key (ca.key or superlink.key?)" if isinstance(key, ec.EllipticCurvePrivateKey) else \
            f"a {type(key).__name__.lstrip('_')}"
        raise ConfigError(f"node config signing-key={str(path)!r} holds {kind}, not an Ed25519 "
                          f"signing key; {SIGNING_KEY_HINT.replace('NAME', name)} (`fedstill institution-init` or "
                          "`fedstill keygen` writes it)")


def check_node_config(config: Mapping[str, UserConfigValue]) -> NodeConfig:
    """The node config parses as the ClientApp will parse it, the files it names exist where the node will
    look (keys, data, ledgers' folders), and the data folder holds one of the known layouts (its labels and
    image sizes are checked when a run tells the node the dataset)."""
    node = NodeConfig.from_node_config(config)
    check_absolute_paths(config)
    for key, value in (("signing-key", node.signing_key), ("data-path", node.data_path), ("public-dir", node.public_dir)):
        if value is not None and not Path(value).expanduser().exists():
            raise ConfigError(f"node config {key}={value!r}: no such file or folder on this machine")
    for key, value in (("release-log", node.release_log), ("privacy-ledger", node.privacy_ledger)):
        if value is not None and not Path(value).expanduser().parent.is_dir():
            raise ConfigError(f"node config {key}={value!r}: its folder does not exist; create it first")
    if node.signing_key is not None:
        _check_signing_key_role(Path(node.signing_key).expanduser(), node.institution_id or "NAME")
    if node.data_path is not None:
        from common.tasks.institution_files import detect_format

        detect_format(Path(node.data_path).expanduser())  # a known layout (the run checks labels and sizes)
    received = (("allow-list", node.allow_list, "the consortium's allow-list.toml"),
                ("coordinator-key", node.coordinator_key, "coordinator.pub"))
    for key, value, what in received:  # what the coordinator sends; a missing site policy has its own check
        if value is not None and not value.startswith("ed25519:") and not Path(value).expanduser().is_file():
            raise ConfigError(f"node config {key}={value!r}: no such file on this machine; copy {what} the coordinator "
                              "sent there")
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
