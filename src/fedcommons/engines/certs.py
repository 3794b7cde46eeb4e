"""Development PKI for the deployment engine: a CA, the SuperLink's certificate, node keys.

Built on ``cryptography``. Formats are the ones Flower 1.41 reads:

- ``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile
  server.key``: PEM certificates, an unencrypted PKCS#8 PEM key;
- ``flower-supernode --root-certificates ca.pem``: the CA certificate;
- ``flower-supernode --auth-supernode-private-key node.key``: an EC private key on a NIST
  curve in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes);
- ``flwr supernode register node.pub``: the matching OpenSSH public key
  (``ecdsa-sha2-nistp384 AAAA... comment``).

Production operators bring certificates from their own CA; these are for development,
tests and small federations. Private keys are written with mode 0600 and never
overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcommons.errors import CertificateError, InvalidNameError
from fedcommons.names import NameKind, check_name

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1")
#: Curve of CA, server and node keys (Flower generates P-384 node keys too).
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class NodeKeyPair:
    """Paths of one SuperNode's key pair and its public key's SHA-256 fingerprint."""

    name: str
    private_key: Path
    public_key: Path
    fingerprint: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CertificateError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_cert_and_key(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    overwrite: bool,
) -> tuple[Path, Path]:
    """Write the private key (0600), then its PEM certificate; return (cert, key) paths."""
    _write(key_path, _pem_key(key), private=True, overwrite=overwrite)
    _write(
        cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite
    )
    return cert_path, key_path


def _parse_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    label_ok = all(part and len(part) <= 63 for part in host.rstrip(".").split("."))
    if not host or not label_ok or any(c.isspace() or c in "/:@" for c in host):
        raise CertificateError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def create_ca(
    out_dir: Path,
    *,
    common_name: str = "fedcommons development CA",
    days: int = 825,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a self-signed CA (``ca.pem``, ``ca.key``) into ``out_dir``; return both paths."""
    if days < 1:
        raise CertificateError(f"days must be >= 1, got {days}")
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return _write_cert_and_key(
        Path(out_dir) / CA_CERT, Path(out_dir) / CA_KEY, cert, key, overwrite
    )


def load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read ``ca.pem`` and ``ca.key`` from ``out_dir`` (raise CertificateError if unusable)."""
    cert_path, key_path = Path(out_dir) / CA_CERT, Path(out_dir) / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertificateError(
            f"{exc.filename} not found: run 'fedcommons certs ca' first"
        ) from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"cannot read the CA in {out_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an EC private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CertificateError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    *extensions: x509.ExtensionType,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh key and its certificate for ``usage`` (server or client auth), signed by the CA."""
    key = ec.generate_private_key(CURVE())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA384()), key


def create_server_cert(
    out_dir: Path, hosts: Sequence[str] = (), *, days: int = 397, overwrite: bool = False
) -> tuple[Path, Path]:
    """Sign a SuperLink certificate with the CA in ``out_dir``; return (cert, key) paths.

    Its subject alternative names are ``localhost``, ``127.0.0.1`` and every entry of
    ``hosts`` (DNS names or IP addresses the SuperNodes dial).
    """
    if days < 1:
        raise CertificateError(f"days must be >= 1, got {days}")
    ca_cert, ca_key = load_ca(out_dir)
    names: list[x509.GeneralName] = []
    for host in (*DEFAULT_SERVER_HOSTS, *hosts):
        parsed = _parse_host(host.strip())
        if parsed not in names:
            names.append(parsed)
    first = next((h for h in hosts if h.strip()), "localhost")
    cert, key = _sign_leaf(
        ca_cert,
        ca_key,
        first,
        days,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(names),
    )
    return _write_cert_and_key(
        Path(out_dir) / SERVER_CERT, Path(out_dir) / SERVER_KEY, cert, key, overwrite
    )


def create_operator_cert(
    out_dir: Path, name: str, *, days: int = 397, overwrite: bool = False
) -> tuple[Path, Path]:
    """Sign a TLS *client* certificate for operator ``name`` with the CA in ``out_dir``.

    It authenticates an operator at the coordinator's ``operator-address`` (the Control
    API served beyond loopback). Written as ``operators/NAME.pem`` and ``NAME.key``
    (0600); returns (cert, key) paths.
    """
    try:
        check_name(name, NameKind.key)
    except InvalidNameError as exc:
        raise CertificateError(f"operator name: {exc}") from None
    if days < 1:
        raise CertificateError(f"days must be >= 1, got {days}")
    ca_cert, ca_key = load_ca(out_dir)
    cert, key = _sign_leaf(ca_cert, ca_key, name, days, ExtendedKeyUsageOID.CLIENT_AUTH)
    folder = Path(out_dir) / "operators"
    return _write_cert_and_key(folder / f"{name}.pem", folder / f"{name}.key", cert, key, overwrite)


def server_cert_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    ]


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH public key blob, as ``ssh-keygen -l`` prints."""
    import base64
    import hashlib

    blob = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def create_node_keys(out_dir: Path, name: str, *, overwrite: bool = False) -> NodeKeyPair:
    """Write ``<name>.key`` (OpenSSH EC P-384 private key) and ``<name>.pub`` into ``out_dir``.

    The private key stays at the institution (``fedcommons client join --key``); the
    public key goes to the coordinator's allowlist.
    """
    try:
        check_name(name, NameKind.key)  # it names two files in out_dir
    except InvalidNameError as exc:
        raise CertificateError(f"node name: {exc}") from None
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out_dir = Path(out_dir)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    _write(priv_path, private, private=True, overwrite=overwrite)
    _write(pub_path, public + f" {name}\n".encode(), private=False, overwrite=overwrite)
    return NodeKeyPair(name, priv_path, pub_path, public_key_fingerprint(key.public_key()))


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH public key Flower accepts (EC on a NIST curve) or raise CertificateError."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise CertificateError(f"public key {path} not found") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{path} is not an OpenSSH public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1
    ):
        raise CertificateError(
            f"{path}: Flower's node authentication needs an ECDSA key on a NIST curve "
            "(P-256, P-384 or P-521), e.g. 'fedcommons certs node NAME'"
        )
    return key


def check_node_private_key(path: Path) -> None:
    """Raise CertificateError unless ``path`` is an OpenSSH EC private key Flower can load."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertificateError(f"node key {path} not found") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: node authentication needs an EC (ECDSA) key")


def check_pem_certificate(path: Path, what: str) -> None:
    """Raise CertificateError unless ``path`` holds a PEM certificate."""
    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise CertificateError(f"{what} {path} not found") from exc
    except ValueError as exc:
        raise CertificateError(f"{what} {path} is not a PEM certificate: {exc}") from exc


def allowlist_keys(paths: Sequence[Path]) -> list[Path]:
    """Expand files and directories (every ``*.pub`` inside) into validated key files."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise CertificateError(f"allowlist directory {path} holds no *.pub file")
        else:
            files = [path]
        for file in files:
            load_node_public_key(file)
            found.append(file)
    return found
