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
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import atomic_write
from .errors import KeyFileError


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
    now = _dt.datetime.now(_dt.timezone.utc)
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
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
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
    _write_new(keys.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), 0o600)
    _write_new(keys.public_key, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH) + b"\n", 0o644)
    return keys
