"""Key material for the transport options: TLS for the SuperLink, keys for SuperNode auth.

The protocol does not rely on the transport: every payload is signed and sealed end to end. TLS
adds what sealing leaves visible on the wire (routing headers, fingerprints, job ids, sizes) and
authenticates the SuperLink to the owner's SuperNode; Flower's SuperNode authentication
(``--enable-supernode-auth``, which requires TLS) keeps unregistered nodes from pulling tasks at
all. This module makes the files those options need, with ``cryptography`` only:

* ``make_tls_files(dir, hosts)``: a private CA and a server certificate for ``hosts`` (IP
  addresses or DNS names) signed by it. SuperLink: ``--ssl-ca-certfile ca.pem --ssl-certfile
  server.pem --ssl-keyfile server.key``; SuperNode: ``--root-certificates ca.pem``; ``flwr run``:
  ``root-certificates = "ca.pem"`` in the connection's config.
* ``make_supernode_auth_keys(dir)``: an ECDSA P-384 key pair in OpenSSH format, the form
  ``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register`` takes.

Private keys are written 0600, atomically; existing files are never overwritten.

``python -m protocol.transport tls DIR --host NAME`` and ``python -m protocol.transport node-key
DIR`` make the same files from the command line (README "Deployment notes"). The entity's server
certificate always names 127.0.0.1 as well: the entity's own ``flwr`` calls and its ServerApp
reach the SuperLink over loopback, with TLS verified like any other client.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import atomic_write, read_regular
from .errors import KeyFileError

__all__ = ["AuthKeys", "MAX_KEY_FILE", "TlsFiles", "certificate_names", "check_node_public_key", "main", "make_supernode_auth_keys", "make_tls_files"]


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class AuthKeys:
    private_key: Path
    public_key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        atomic_write(path, data, mode=mode, overwrite=False)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite key material") from exc


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise KeyFileError("a server certificate needs at least one host name or address")
    return x509.SubjectAlternativeName(names)


def make_tls_files(directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost"), *, days: int = 365) -> TlsFiles:
    """A private CA (``ca.pem``) and a server certificate (``server.pem``, ``server.key``)."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite key material")
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blindprune private CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    hosts = list(hosts)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "server")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_new(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(
        files.server_key,
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    return files


def make_supernode_auth_keys(directory: Path, name: str = "supernode") -> AuthKeys:
    """An ECDSA P-384 key pair in OpenSSH format for Flower's SuperNode authentication."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = AuthKeys(directory / f"{name}_auth", directory / f"{name}_auth.pub")
    for path in (keys.private_key, keys.public_key):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite key material")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_new(
        keys.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), 0o600
    )
    _write_new(keys.public_key, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", 0o644)
    return keys


MAX_KEY_FILE = 64 * 1024


def certificate_names(path: Path) -> frozenset[str]:
    """The host names and IP addresses a PEM server certificate is valid for (its SAN entries)."""
    data = read_regular(Path(path), limit=MAX_KEY_FILE, error=KeyFileError, what="TLS certificate")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise KeyFileError(f"TLS certificate {path} is not a PEM certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset([*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))])


def check_node_public_key(path: Path) -> bytes:
    """The bytes of a SuperNode public key file if it is what ``flwr supernode register`` accepts.

    Checked here so that a wrong file put in the entity's nodes folder is reported by name, in
    one line, instead of as a Flower exit code.
    """
    data = read_regular(Path(path), limit=MAX_KEY_FILE, error=KeyFileError, what="SuperNode public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"SuperNode public key {path} is not an OpenSSH public key; give the .pub file made by `python -m protocol.transport node-key`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(f"SuperNode public key {path} is not an elliptic-curve (ECDSA) key; Flower accepts only NIST curves such as P-384")
    return data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m protocol.transport", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a private CA and a server certificate for the entity's SuperLink")
    tls.add_argument("dir", type=Path, help="folder for ca.pem, server.pem, server.key (created)")
    tls.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP address owners use to reach the entity (repeatable); 127.0.0.1 is always added",
    )
    tls.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    node = sub.add_parser("node-key", help="a key pair for an owner's SuperNode (SuperNode authentication)")
    node.add_argument("dir", type=Path, help="folder for NAME_auth and NAME_auth.pub (created)")
    node.add_argument("--name", default="supernode", help="file name stem (default supernode)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tls":
            if args.days < 1:
                raise KeyFileError("--days must be at least 1")
            hosts = list(dict.fromkeys([*args.host, "127.0.0.1"]))
            files = make_tls_files(args.dir, hosts, days=args.days)
            print(f"entity SuperLink: --tls-cert {files.server_cert} --tls-key {files.server_key} --tls-ca {files.ca_cert}")
            print(f"owners: --tls-ca {files.ca_cert} (valid for {', '.join(hosts)})")
        else:
            keys = make_supernode_auth_keys(args.dir, args.name)
            print(f"owner: --node-key {keys.private_key}")
            print(f"entity operator: copy {keys.public_key} into the entity's HOME/nodes/")
    except (KeyFileError, OSError) as exc:
        print(f"protocol.transport: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
