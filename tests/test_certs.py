"""Development PKI: CA, SuperLink certificate and node keys in the formats Flower reads."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key

from fedcommons.engines import certs
from fedcommons.errors import CertificateError


def test_server_certificate_chains_to_the_ca_and_names_localhost_loopback_and_extra_hosts(
    tmp_path: Path,
) -> None:
    certs.create_ca(tmp_path)
    cert_path, key_path = certs.create_server_cert(tmp_path, ["coord.example.org", "10.0.0.5"])
    assert certs.server_cert_hosts(cert_path) == [
        "localhost",
        "coord.example.org",
        "127.0.0.1",
        "10.0.0.5",
    ]
    # Python's TLS stack accepts the pair and verifies it against the CA
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    ca = x509.load_pem_x509_certificate((tmp_path / certs.CA_CERT).read_bytes())
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_written_owner_only(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    certs.create_server_cert(tmp_path)
    pair = certs.create_node_keys(tmp_path / "nodes", "site-a")
    for path in (tmp_path / certs.CA_KEY, tmp_path / certs.SERVER_KEY, pair.private_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_node_keys_are_openssh_p384_that_flower_loads(tmp_path: Path) -> None:
    pair = certs.create_node_keys(tmp_path, "hospital-a")
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    # Flower's own `flwr supernode register` loader accepts the public key
    pem = try_load_public_key(pair.public_key)
    assert serialization.load_pem_public_key(pem).public_numbers() == (
        private.public_key().public_numbers()
    )
    assert pair.public_key.read_text().split()[0] == "ecdsa-sha2-nistp384"
    assert pair.fingerprint.startswith("SHA256:")


def test_existing_key_is_not_overwritten_without_force(tmp_path: Path) -> None:
    """Input tried: creating node key 'a' twice in the same directory."""
    first = certs.create_node_keys(tmp_path, "a")
    before = first.private_key.read_bytes()
    with pytest.raises(CertificateError, match="exists; pass --force"):
        certs.create_node_keys(tmp_path, "a")
    assert first.private_key.read_bytes() == before
    certs.create_node_keys(tmp_path, "a", overwrite=True)
    assert first.private_key.read_bytes() != before


def test_server_certificate_without_a_ca_names_the_missing_file(tmp_path: Path) -> None:
    """Input tried: `certs server` in an empty directory."""
    with pytest.raises(CertificateError, match=r"ca\.pem not found"):
        certs.create_server_cert(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_host_name_is_rejected(tmp_path: Path) -> None:
    """Input tried: --host 'http://coord:9093' (a URL, not a host)."""
    certs.create_ca(tmp_path)
    with pytest.raises(CertificateError, match="neither an IP address nor a DNS name"):
        certs.create_server_cert(tmp_path, ["http://coord:9093"])
    assert not (tmp_path / certs.SERVER_CERT).exists()


def test_bad_node_name_is_rejected(tmp_path: Path) -> None:
    """Input tried: node name '../escape'."""
    with pytest.raises(CertificateError, match="node name"):
        certs.create_node_keys(tmp_path, "../escape")


def test_allowlist_rejects_an_rsa_key_flower_cannot_use(tmp_path: Path) -> None:
    """Input tried: an ssh-rsa public key in the allowlist directory."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(CertificateError, match="ECDSA key on a NIST curve"):
        certs.allowlist_keys([tmp_path])


def test_allowlist_expands_directories_and_rejects_an_empty_one(tmp_path: Path) -> None:
    """Input tried: an allowlist directory without any *.pub file."""
    for name in ("b", "a"):
        certs.create_node_keys(tmp_path / "keys", name)
    assert [p.name for p in certs.allowlist_keys([tmp_path / "keys"])] == ["a.pub", "b.pub"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CertificateError, match="holds no"):
        certs.allowlist_keys([tmp_path / "empty"])


def test_node_private_key_check_rejects_a_pem_certificate(tmp_path: Path) -> None:
    """Input tried: --key pointing at the CA certificate instead of a node key."""
    ca_cert, _ = certs.create_ca(tmp_path)
    with pytest.raises(CertificateError, match="not an unencrypted OpenSSH private key"):
        certs.check_node_private_key(ca_cert)
