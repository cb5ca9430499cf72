"""TLS and SuperNode-auth key material: valid chain, right hosts, right formats, private keys 0600."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from protocol.errors import KeyFileError
from protocol.transport import make_supernode_auth_keys, make_tls_files


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path, ["127.0.0.1", "entity.example"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["entity.example"]
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_tls_handshake_succeeds_with_the_ca_and_fails_without(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    good = ssl.create_default_context(cafile=str(files.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, good.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.recv(2) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", port)) as raw, ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1"):
            pass
    thread.join(timeout=10)
    listener.close()


def test_supernode_auth_keys_load_the_way_flower_loads_them(tmp_path: Path) -> None:
    keys = make_supernode_auth_keys(tmp_path)
    private = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_key_material_is_never_overwritten(tmp_path: Path) -> None:
    make_tls_files(tmp_path)
    before = (tmp_path / "server.key").read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        make_tls_files(tmp_path)
    assert (tmp_path / "server.key").read_bytes() == before
    make_supernode_auth_keys(tmp_path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        make_supernode_auth_keys(tmp_path)
