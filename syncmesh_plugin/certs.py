"""A tiny private CA for users without a PKI: `syncmesh-plugin certs init` and `certs issue NODE`.

`init` writes ca.pem and ca-key.pem (the key mode 0600); `issue NODE` writes NODE.pem and NODE-key.pem,
signed by that CA, valid as both a TLS server and a TLS client certificate (the same pair is the
node's HTTPS certificate and its client certificate towards peers), with subject alternative names
for the node name, localhost, 127.0.0.1 and every --host given (names or IP addresses).

Keys are ECDSA P-256. Nothing here is ever logged. The builders (build_ca, sign_node) are also what the
cluster's automatic PKI (pki.py, autotls.py) uses.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CA_DAYS = 3650
NODE_DAYS = 825
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DNS_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


class CertError(ValueError):
    """A problem worded for the operator."""


@dataclass(frozen=True)
class Issued:
    cert: str
    key: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _save(directory: str, key_name: str, cert_name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
          force: bool) -> Issued:
    """Write a key (0600) and its certificate (0644), refusing to overwrite either unless forced."""
    key_path = os.path.abspath(os.path.join(directory, key_name))
    cert_path = os.path.abspath(os.path.join(directory, cert_name))
    if not force:
        for p in (key_path, cert_path):
            if os.path.lexists(p):
                raise CertError(f"{p} already exists (use --force to overwrite it)")
    _write(key_path, _key_pem(key), 0o600, force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return Issued(cert_path, key_path)


def _write(path: str, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    if not force:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CertError(f"{path} already exists (use --force to overwrite it)") from None
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask, and an existing file keeps its own
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build_ca(name: str = "syncmesh CA", *, days: int = CA_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (path length 0: it signs node certificates only) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "syncmesh")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def init_ca(directory: str, *, name: str = "syncmesh CA", days: int = CA_DAYS, force: bool = False) -> Issued:
    """Create a CA certificate and key in ``directory``; refuse to overwrite one unless ``force``."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert, key = build_ca(name, days=days)
    return _save(directory, CA_KEY, CA_CERT, key, cert, force)


def _load_ca(directory: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = os.path.join(directory, CA_CERT), os.path.join(directory, CA_KEY)
    try:
        with open(cert_path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        with open(key_path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except FileNotFoundError as exc:
        raise CertError(f"no CA in {directory} ({exc.filename} missing): run `syncmesh-plugin certs init` first"
                        ) from None
    except ValueError:
        raise CertError(f"cannot read the CA in {directory} (not a PEM certificate and unencrypted key)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: expected an EC private key")
    return cert, key


def san_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for h in hosts:
        h = h.strip()
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            continue
        except ValueError:
            pass
        if not _DNS_RE.fullmatch(h):
            raise CertError(f"--host {h!r}: expected a host name or an IP address")
        out.append(x509.DNSName(h.rstrip(".")))
    return out


def check_node_name(node: str) -> None:
    if not _NODE_RE.fullmatch(node):
        raise CertError(f"node name {node!r}: letters, digits, '_', '.', '-' (at most 63, starting with a "
                        "letter or digit)")


def sign_node(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, node: str,
              public_key: ec.EllipticCurvePublicKey, hosts: Sequence[str] = (), *,
              lifetime: datetime.timedelta = datetime.timedelta(days=NODE_DAYS)) -> x509.Certificate:
    """A certificate for ``node``'s public key signed by the CA, valid as TLS server and client, naming
    the node, every host given, localhost and 127.0.0.1; never valid past the CA itself."""
    check_node_name(node)
    now = _now()
    names = san_names([node.replace("_", "-"), *hosts, "localhost", "127.0.0.1"])
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "syncmesh")]))
        .issuer_name(ca_cert.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                     key_cert_sign=False, crl_sign=False, content_commitment=False,
                                     data_encipherment=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def issue(directory: str, node: str, hosts: Sequence[str] = (), *, days: int = NODE_DAYS,
          force: bool = False) -> Issued:
    """Issue NODE.pem / NODE-key.pem in ``directory``, signed by the CA found there."""
    check_node_name(node)
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_node(ca_cert, ca_key, node, key.public_key(), hosts, lifetime=datetime.timedelta(days=days))
    return _save(directory, f"{node}-key.pem", f"{node}.pem", key, cert, force)
