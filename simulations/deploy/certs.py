"""A private CA, the SuperLink's TLS certificate and SuperNode authentication keys for a deployment.

What Flower 1.42 reads, checked against its source:

- `flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key`
  hands the two last files to uvicorn (Python's `ssl`), so superlink.key is an unencrypted PEM key.
  With `--isolation subprocess` (the default) the SuperLink starts `flower-superexec`, which connects
  back to `--host` (0.0.0.0 becomes 127.0.0.1, :: becomes ::1) and checks the certificate against
  ca.crt: the server certificate therefore always names localhost, 127.0.0.1 and ::1 as well.
- `flower-supernode --root-certificates ca.crt` and the `flwr` CLI verify the SuperLink with httpx
  (Python's `ssl` again) against ca.crt.
- `flower-supernode --auth-supernode-private-key NAME.key` loads an OpenSSH private key
  (`load_ssh_private_key(data, None)`: no passphrase) that must be an EC key.
- `flwr supernode register NAME.pub` loads an OpenSSH public line (`load_ssh_public_key`) on a NIST curve.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.audit.keys import check_name
from common.errors import ConfigError
from common.files import atomic_write_bytes

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
NODES = "nodes"
LOOPBACK = ("localhost", "127.0.0.1", "::1")  # where flower-superexec reaches the SuperLink
CURVE = ec.SECP384R1
DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

PemObject = ec.EllipticCurvePrivateKey | x509.Certificate
Host = str | ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_host(text: str) -> Host:
    """A DNS name (lower-cased) or an IP address, or ConfigError saying what is wrong with `text`."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--host: empty host name; give a DNS name (superlink.example.org) or an IP address")
    where = f"--host {text!r}"
    if any(c.isspace() for c in text):
        raise ConfigError(f"{where}: contains spaces; give one host per --host")
    if "://" in text or "/" in text:
        raise ConfigError(f"{where}: give a bare host name or IP address, not a URL or path")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if ":" in bare:
        raise ConfigError(f"{where}: not an IP address; drop any :port (the certificate names hosts, not ports)")
    if not bare.isascii():
        raise ConfigError(f"{where}: not ASCII; write an internationalised name in its xn-- (punycode) form")
    name = bare.rstrip(".").lower()
    labels = name.split(".")
    body = labels[1:] if labels[0] == "*" and len(labels) > 2 else labels
    if len(name) > 253 or not all(DNS_LABEL.match(label) for label in body):
        raise ConfigError(f"{where}: not a valid DNS name (labels of 1-63 letters, digits or '-', "
                          "not starting or ending with '-') nor an IP address")
    if body[-1].isdigit():
        raise ConfigError(f"{where}: looks like an IP address but is not a valid one")
    return name


def host_names(hosts: Sequence[str], with_loopback: bool = True) -> list[Host]:
    """The parsed, de-duplicated hosts in the order given, then the loopback names flower-superexec uses."""
    if not hosts:
        raise ConfigError("no host given: pass the name or address nodes use to reach the SuperLink (--host)")
    parsed = [parse_host(h) for h in hosts] + ([parse_host(h) for h in LOOPBACK] if with_loopback else [])
    return list(dict.fromkeys(parsed))


def _general_name(host: Host) -> x509.GeneralName:
    return x509.DNSName(host) if isinstance(host, str) else x509.IPAddress(host)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"--days must be a whole number of days >= 1, got {days!r}")
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=1), now + dt.timedelta(days=days)


def make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-384 CA that may sign server certificates but no further CAs."""
    if not common_name or not common_name.strip():
        raise ConfigError("CA common name is empty; give a name such as 'fedstill CA'")
    start, end = _validity(days)
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(key_id, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], days: int,
    with_loopback: bool = True,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A P-384 TLS server certificate for the SuperLink, signed by the CA, naming `hosts` (CN = the first)."""
    names = host_names(hosts, with_loopback)
    start, end = _validity(days)
    key = ec.generate_private_key(CURVE())
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0]))]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS names and IP addresses, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def load_ca(folder: Path, passphrase: bytes | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The CA kept in `folder` (ca.key + ca.crt, the key decrypted with `passphrase`), or None when it holds neither."""
    key_path, cert_path = folder / CA_KEY, folder / CA_CERT
    if not key_path.exists() and not cert_path.exists():
        return None
    if not key_path.is_file() or not cert_path.is_file():
        present, absent = (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
        raise ConfigError(f"{present} is there but {absent} is not; restore the pair, or use an empty --ca-dir for a new CA")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
    except TypeError:
        raise ConfigError(f"{key_path} is encrypted: pass --passphrase-env VAR with its passphrase in $VAR" if passphrase is None
                          else f"{key_path} is not encrypted: drop --passphrase-env") from None
    except ValueError:
        raise ConfigError(f"{key_path} or {cert_path} does not load: wrong passphrase (--passphrase-env), "
                          "or not the PEM files `fedstill certs --ca-dir` wrote") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"{key_path} is not the key of {cert_path}; keep the two files `fedstill certs --ca-dir` wrote together")
    return key, cert


def make_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode authentication key: EC P-384, the curve Flower's docs use."""
    return ec.generate_private_key(CURVE())


def node_public_line(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    """`ecdsa-sha2-nistp384 AAAA... name`: the file `flwr supernode register` reads."""
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{public.decode('ascii')} {check_name(name)}\n"


def write_node_key(
    key: ec.EllipticCurvePrivateKey, folder: Path | str, name: str, passphrase: bytes | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write `<name>.key` (OpenSSH private format, unencrypted, 0600) and `<name>.pub` (OpenSSH public line).

    A passphrase is refused: flower-supernode 1.42 reads the key with `load_ssh_private_key(data, None)`,
    so it could not use an encrypted one (and OpenSSH encryption would need the `bcrypt` package).
    """
    if passphrase:
        raise ConfigError(f"node key {name!r}: flower-supernode cannot read a passphrase-protected "
                          "--auth-supernode-private-key; write it unencrypted and rely on its 0600 mode")
    folder = Path(folder)
    private_path, public_path = folder / f"{check_name(name)}.key", folder / f"{name}.pub"
    refuse_existing([private_path, public_path], overwrite)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    write_atomic(private_path, data, private=True, overwrite=overwrite)
    write_atomic(public_path, node_public_line(key, name).encode("ascii"), overwrite=overwrite)
    return private_path, public_path


def write_pem(
    path: Path | str, key_or_cert: PemObject, private: bool = False, passphrase: bytes | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a certificate, or a private key as PKCS#8 PEM (mode 0600, encrypted when a passphrase is given)."""
    if isinstance(key_or_cert, x509.Certificate):
        if private or passphrase:
            raise ConfigError(f"{path}: a certificate is public; write it without private=True or a passphrase")
        data = key_or_cert.public_bytes(serialization.Encoding.PEM)
    else:
        if not private:
            raise ConfigError(f"{path}: refusing to write a private key without private=True (mode 0600)")
        encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        data = key_or_cert.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return write_atomic(Path(path), data, private=private, overwrite=overwrite)


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """ConfigError naming every file that exists, unless overwriting was asked for."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist(s); refusing to overwrite keys or certificates "
                          "(pass --overwrite to replace them, or choose another --out)")


def write_atomic(path: Path, data: bytes, private: bool = False, overwrite: bool = False) -> Path:
    """Write `data` to a temporary file beside `path` (0600 when private, else 0644), then rename it into place."""
    path = Path(path)
    refuse_existing([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)
    return path


def _load(folder: Path) -> tuple[list[Any], list[str]]:
    """[CA certificate, server certificate, server key], and the problems that kept any from loading."""
    problems: list[str] = []
    loaded: list[Any] = []
    for name, loader in ((CA_CERT, x509.load_pem_x509_certificate), (SERVER_CERT, x509.load_pem_x509_certificate),
                         (SERVER_KEY, lambda data: serialization.load_pem_private_key(data, password=None))):
        path = folder / name
        try:
            loaded.append(loader(path.read_bytes()))
        except FileNotFoundError:
            problems.append(f"{path} is missing; run `fedstill certs --ca-dir CADIR --out {folder} --host HOST`")
        except TypeError:
            problems.append(f"{path} is encrypted; flower-superlink cannot read an encrypted key (write it without one)")
        except ValueError as error:
            problems.append(f"{path} is not a PEM {'key' if name == SERVER_KEY else 'certificate'} ({error})")
    return loaded, problems


def check_bundle(folder: Path | str, hosts: Sequence[str] = ("127.0.0.1",)) -> list[str]:
    """What is wrong with the CA / SuperLink files in `folder` (empty when nothing is).

    Checks that superlink.crt is signed by ca.crt, that both are valid now, that superlink.crt is a
    server certificate naming every one of `hosts` (by default 127.0.0.1, where flower-superexec
    connects), and that superlink.key is its key.
    """
    folder = Path(folder)
    loaded, problems = _load(folder)
    if problems:
        return problems
    ca, cert, key = loaded
    now = dt.datetime.now(dt.UTC)
    for name, c in ((CA_CERT, ca), (SERVER_CERT, cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            problems.append(f"{folder / name} is valid only from {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                            f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make new ones with `fedstill certs --overwrite`")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"{folder / SERVER_CERT} is not signed by {folder / CA_CERT}: nodes trusting this CA will "
                        "refuse the SuperLink; make both with one `fedstill certs` run")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        problems.append(f"{folder / SERVER_KEY} does not belong to {folder / SERVER_CERT}; the SuperLink cannot "
                        "serve TLS with them: make both with one `fedstill certs` run")
    return problems + _server_problems(folder / SERVER_CERT, cert, hosts)


def _server_problems(path: Path, cert: x509.Certificate, hosts: Sequence[str]) -> list[str]:
    problems = []
    names = subject_alt_names(cert)
    missing = [str(h) for h in (parse_host(h) for h in hosts) if str(h) not in names]
    if missing:
        problems.append(f"{path} does not name {', '.join(missing)} (it names {', '.join(names) or 'nothing'}); "
                        "clients reaching the SuperLink there fail TLS: add --host for each")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            problems.append(f"{path} is not for TLS servers (no serverAuth extended key usage)")
    except x509.ExtensionNotFound:
        pass  # no EKU extension: any use is allowed
    return problems
