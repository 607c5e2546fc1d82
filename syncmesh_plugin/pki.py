"""The cluster's own PKI, with nothing to configure: the CA, join tokens, node certificates, revocation.

Everything cryptographic is done by the `cryptography` package (keys, certificates, CSRs, CRLs,
ECDSA signatures) and the standard `hmac`/`hashlib`/`secrets` modules; nothing here is hand-made.

- The **CA** (ECDSA P-256, 10 years) is created by the first node of a cluster; its key never leaves
  that node's data root (`<data_root>/pki/ca/`). That node is the cluster's *signer*.
- The **join token** printed by `syncmesh-plugin token` is `SM1<sha256 of the CA certificate>::<secret>`
  (k3s style: 64 hex digits, then 43 characters of base64url = 256 random bits). A joining node checks
  the CA it finds in etcd against the hash, and proves the secret with an HMAC over its certificate
  request: the secret itself never leaves a node, not even inside TLS.
- The **trust bundle** (`pki/ca` in etcd) lists the CA certificates nodes accept and the one that signs
  new certificates; it is signed by every CA in it, and a node only takes a newer bundle (higher
  `seq`) signed by a CA it already trusts, so whoever can write etcd cannot plant a CA.
- **Revocation**: one X.509 CRL per CA (`pki/crl`), signed by that CA; a node only takes a CRL whose
  signature verifies and whose number is not lower than the one it has, so a CRL cannot be rolled back
  through etcd either.

This module is synchronous and does no network I/O; autotls.py runs it against etcd.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .certs import CertError, build_ca, check_node_name, san_names, sign_node

TOKEN_PREFIX = "SM1"
TOKEN_RE = re.compile(r"SM1([0-9a-f]{64})::([A-Za-z0-9_-]{43,128})")
CA_DAYS = 3650
BACKDATE = datetime.timedelta(minutes=5)  # certs.sign_node's not_valid_before: now - 5 minutes (clock skew)
JOIN_CONTEXT = b"syncmesh-join-v1\0"
RENEW_CONTEXT = b"syncmesh-renew-v1\0"
BUNDLE_CONTEXT = b"syncmesh-trust-v1\0"


class PkiError(RuntimeError):
    """A problem worded for the operator; never contains a secret."""


# ---- small helpers -------------------------------------------------------------------------------------------


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER: what a join token pins."""
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_cert(pem: str | bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise PkiError("not a PEM certificate") from None


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise PkiError("not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("expected an EC private key")
    return key


def serial_hex(serial: int) -> str:
    """As ssl's getpeercert() spells a serial number: upper-case hex, no leading zeros."""
    return f"{serial:X}"


def common_name(cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise PkiError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise PkiError("bad base64") from None


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# ---- join token ----------------------------------------------------------------------------------------------


def new_secret() -> str:
    """256 random bits, base64url without padding (43 characters)."""
    return secrets.token_urlsafe(32)


def make_token(ca_fingerprint: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}{ca_fingerprint}::{secret}"


@dataclass(frozen=True)
class JoinToken:
    ca_fingerprint: str
    secret: str = field(repr=False)


def parse_token(token: str) -> JoinToken:
    """Split a join token; the error never repeats it (it may end up in a log)."""
    m = TOKEN_RE.fullmatch(token.strip())
    if m is None:
        raise PkiError("join_token: expected the token `syncmesh-plugin token` prints on the first node "
                       "(SM1 + 64 hex digits + '::' + secret)")
    return JoinToken(m.group(1), m.group(2))


def join_proof(secret: str, node: str, csr_der: bytes) -> str:
    """HMAC-SHA256 of the request under the token's secret: proves the secret without sending it."""
    return hmac.new(secret.encode(), JOIN_CONTEXT + node.encode() + b"\0" + csr_der, hashlib.sha256).hexdigest()


def check_join_proof(secret: str, node: str, csr_der: bytes, proof: Any) -> bool:
    return isinstance(proof, str) and hmac.compare_digest(join_proof(secret, node, csr_der), proof)


# ---- keys, requests, certificates ----------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, node: str, hosts: Sequence[str] = ()) -> x509.CertificateSigningRequest:
    """A request for `node` naming the addresses peers use (they travel inside the signed request)."""
    check_node_name(node)
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
    try:
        names = san_names(hosts)
    except CertError as exc:
        raise PkiError(str(exc)) from None
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(key, hashes.SHA256())


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_csr(pem: Any) -> x509.CertificateSigningRequest:
    if not isinstance(pem, str) or len(pem) > 16384:
        raise PkiError("malformed certificate request")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError:
        raise PkiError("malformed certificate request") from None
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise PkiError("the certificate request's key is not an EC key")
    return csr


def renew_proof(key: ec.EllipticCurvePrivateKey, node: str, der: bytes) -> str:
    """A signature of the new request by the key of the node's current certificate."""
    return _b64(key.sign(RENEW_CONTEXT + node.encode() + b"\0" + der, ec.ECDSA(hashes.SHA256())))


def check_renew_proof(cert: x509.Certificate, node: str, der: bytes, sig: Any) -> bool:
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return False
    try:
        pub.verify(_unb64(sig), RENEW_CONTEXT + node.encode() + b"\0" + der, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, PkiError):
        return False


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def sign_request(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, csr: x509.CertificateSigningRequest,
                 node: str, hosts: Sequence[str], lifetime: datetime.timedelta) -> x509.Certificate:
    pub = csr.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    try:
        return sign_node(ca_cert, ca_key, node, pub, hosts, lifetime=lifetime)
    except CertError as exc:
        raise PkiError(str(exc)) from None


def new_ca(name: str = "syncmesh cluster CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return build_ca(name, days=CA_DAYS)


# ---- revocation lists ----------------------------------------------------------------------------------------


def make_crl(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, serials: Iterable[int],
             number: int) -> x509.CertificateRevocationList:
    """A CRL of the CA; next update = the CA's own expiry (OpenSSL refuses an expired CRL, and a new
    one is published whenever something is revoked)."""
    t = now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(t - datetime.timedelta(minutes=5)).next_update(ca_cert.not_valid_after_utc)
         .add_extension(x509.CRLNumber(number), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    for s in sorted(set(serials)):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(t).build())
    return b.sign(ca_key, hashes.SHA256())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def load_crl(pem: Any) -> x509.CertificateRevocationList:
    if not isinstance(pem, str) or len(pem) > 4 * 1024 * 1024:
        raise PkiError("malformed revocation list")
    try:
        return x509.load_pem_x509_crl(pem.encode())
    except ValueError:
        raise PkiError("malformed revocation list") from None


def crl_pem(crl: x509.CertificateRevocationList) -> str:
    return crl.public_bytes(serialization.Encoding.PEM).decode()


# ---- the trust bundle ----------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """The CAs the cluster accepts (`cas`), the one that signs new certificates (`current`), who holds the
    keys (`signer`), a sequence number, and one signature per CA."""

    seq: int
    cas: list[x509.Certificate]
    current: str
    signer: str
    sigs: dict[str, str] = field(default_factory=dict)

    def fingerprints(self) -> list[str]:
        return [fingerprint(c) for c in self.cas]

    def ca(self, fp: str) -> x509.Certificate | None:
        for c in self.cas:
            if fingerprint(c) == fp:
                return c
        return None

    def payload(self) -> bytes:
        return BUNDLE_CONTEXT + canonical({"seq": self.seq, "cas": [cert_pem(c) for c in self.cas],
                                           "current": self.current, "signer": self.signer})

    def sign(self, keys: dict[str, ec.EllipticCurvePrivateKey]) -> Bundle:
        data = self.payload()
        self.sigs = {fp: _b64(k.sign(data, ec.ECDSA(hashes.SHA256()))) for fp, k in keys.items()}
        return self

    def signed_by(self, ca: x509.Certificate) -> bool:
        """Whether the CA's signature of this bundle verifies."""
        pub = ca.public_key()
        sig = self.sigs.get(fingerprint(ca))
        if sig is None or not isinstance(pub, ec.EllipticCurvePublicKey):
            return False
        try:
            pub.verify(_unb64(sig), self.payload(), ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, PkiError):
            return False

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "seq": self.seq, "cas": [cert_pem(c) for c in self.cas], "current": self.current,
                "signer": self.signer, "sigs": dict(self.sigs)}

    @staticmethod
    def from_json(obj: Any) -> Bundle:
        if not isinstance(obj, dict) or obj.get("v") != 1:
            raise PkiError("malformed trust bundle")
        seq, cas, current, signer, sigs = (obj.get(k) for k in ("seq", "cas", "current", "signer", "sigs"))
        if (not isinstance(seq, int) or not isinstance(cas, list) or not cas or len(cas) > 4
                or not isinstance(current, str) or not isinstance(signer, str) or not isinstance(sigs, dict)):
            raise PkiError("malformed trust bundle")
        b = Bundle(seq, [load_cert(c) for c in cas if isinstance(c, str)], current, signer,
                   {str(k): v for k, v in sigs.items() if isinstance(v, str)})
        if len(b.cas) != len(cas) or b.ca(current) is None:
            raise PkiError("malformed trust bundle")
        for c in b.cas:
            bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value if _has_bc(c) else None
            if bc is None or not bc.ca:
                raise PkiError("the trust bundle holds a certificate that is not a CA")
        return b

    def self_consistent(self) -> bool:
        """Every CA in it signed it (what trust through etcd alone can check)."""
        return all(self.signed_by(c) for c in self.cas)


def _has_bc(c: x509.Certificate) -> bool:
    try:
        c.extensions.get_extension_for_class(x509.BasicConstraints)
        return True
    except x509.ExtensionNotFound:
        return False


def accept_with_token(b: Bundle, token: JoinToken) -> bool:
    """A joining node: the CA the token pins is in the bundle and signed it."""
    ca = b.ca(token.ca_fingerprint)
    return ca is not None and b.signed_by(ca)


def accept_update(current: Bundle, new: Bundle) -> bool:
    """A member: a newer bundle signed by a CA it trusts now."""
    if new.seq <= current.seq:
        return False
    return any(new.signed_by(c) for c in current.cas)


# ---- files in the data root ----------------------------------------------------------------------------------


def write_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Atomically (temp file, fsync, rename), with the mode set before any byte is written."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class PkiDir:
    """`<data_root>/pki`: what a node keeps, and the CA keys on the signer.

    node.pem, node-key.pem   this node's certificate and key (the key 0600)
    node-identity.pem        the same key and certificate in one file (0600), replaced in one rename: what
                             the CLI and the embedded etcd load, so a renewal never shows them a new
                             certificate with the old key
    trust.json               the trust bundle and the CRLs this node accepted
    trust.pem                the same CAs and CRLs as PEM, for ssl (load_verify_locations)
    trust-cas.pem            the CAs alone, for the embedded etcd (it parses every block as a certificate)
    admin-token, readonly-token   this node's API tokens (0600)
    ca/<fp>.pem, ca/<fp>-key.pem  the signer only: the CA certificates and keys
    join-secret, join-token   the signer only: the join secret and the token that prints
    issued.json, forgotten.json   the signer only: serials issued per node, forgotten nodes
    """

    def __init__(self, data_root: str) -> None:
        self.dir = os.path.join(data_root, "pki")
        self.ca_dir = os.path.join(self.dir, "ca")
        self.node_cert = os.path.join(self.dir, "node.pem")
        self.node_key = os.path.join(self.dir, "node-key.pem")
        self.identity = os.path.join(self.dir, "node-identity.pem")
        self.trust_json = os.path.join(self.dir, "trust.json")
        self.trust_pem = os.path.join(self.dir, "trust.pem")
        self.trust_cas = os.path.join(self.dir, "trust-cas.pem")
        self.admin_token = os.path.join(self.dir, "admin-token")
        self.readonly_token = os.path.join(self.dir, "readonly-token")
        self.join_secret = os.path.join(self.dir, "join-secret")
        self.join_token = os.path.join(self.dir, "join-token")
        self.issued = os.path.join(self.dir, "issued.json")
        self.forgotten = os.path.join(self.dir, "forgotten.json")

    def ensure(self) -> None:
        # 0755: trust.pem and node.pem are public; every key, secret and token inside is 0600 (root only)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)

    def read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_json(self, path: str, default: Any) -> Any:
        raw = self.read(path)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return default

    def write(self, path: str, data: bytes, mode: int = 0o600) -> None:
        self.ensure()
        write_file(path, data, mode)

    def write_json(self, path: str, obj: Any) -> None:
        self.write(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    # ---- CA keys (signer)
    def ca_paths(self, fp: str) -> tuple[str, str]:
        return os.path.join(self.ca_dir, f"{fp}.pem"), os.path.join(self.ca_dir, f"{fp}-key.pem")

    def save_ca(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> str:
        os.makedirs(self.ca_dir, mode=0o700, exist_ok=True)
        fp = fingerprint(cert)
        c, k = self.ca_paths(fp)
        write_file(k, key_pem(key), 0o600)
        write_file(c, cert_pem(cert).encode(), 0o644)
        return fp

    def ca_key(self, fp: str) -> ec.EllipticCurvePrivateKey | None:
        raw = self.read(self.ca_paths(fp)[1])
        return load_key(raw) if raw is not None else None

    def drop_ca_key(self, fp: str) -> None:
        for p in self.ca_paths(fp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    # ---- API tokens
    def api_tokens(self) -> tuple[str, str]:
        """(admin, read-only) tokens of this node's API, made at the first start."""
        out = []
        for path in (self.admin_token, self.readonly_token):
            raw = self.read(path)
            tok = raw.decode().strip() if raw else ""
            if not tok:
                tok = secrets.token_urlsafe(32)
                self.write(path, tok.encode() + b"\n")
            out.append(tok)
        return out[0], out[1]


def ca_material(bundle: Bundle) -> bytes:
    """The trusted CAs alone as PEM (etcd's --trusted-ca-file reads every block as a certificate)."""
    return "".join(cert_pem(c) for c in bundle.cas).encode()


def ssl_verify_material(bundle: Bundle, crls: Sequence[x509.CertificateRevocationList]) -> bytes:
    """CAs and CRLs as one PEM file for load_verify_locations(cafile=...) (cadata takes no CRLs)."""
    return "".join([cert_pem(c) for c in bundle.cas] + [crl_pem(c) for c in crls]).encode()


class RotatingContext(ssl.SSLContext):
    """An SSLContext whose connections use whatever context `current` is when they start: certificates,
    trusted CAs and CRLs change without restarting the server or the client session (asyncio and aiohttp
    only ever call wrap_bio on it)."""

    current: ssl.SSLContext

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self.current.wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return self.current.wrap_socket(*args, **kwargs)


def rotating(purpose_server: bool, first: ssl.SSLContext) -> RotatingContext:
    ctx = RotatingContext(ssl.PROTOCOL_TLS_SERVER if purpose_server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.current = first
    return ctx


def build_contexts(cert_file: str, key_file: str, verify_file: str, *, crl_check: bool,
                   require_client_cert: bool) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts of a member: TLS 1.2+, our certificate, the cluster's CAs and CRLs.

    The server asks every client for a certificate: one that does not chain to a cluster CA, or that is
    revoked, fails the handshake; none at all passes only without `require_client_cert` (the request is
    then anonymous: health, the status page, or a token). The client always presents ours and accepts
    only a server certificate of a cluster CA (not revoked). Host names are not checked: every member
    holds a certificate of the cluster's own CA, and addresses change."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_file, key_file)
        ctx.load_verify_locations(cafile=verify_file)
        if crl_check:
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    server.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    client.check_hostname = False
    client.verify_mode = ssl.CERT_REQUIRED
    return server, client
