"""Mutual TLS with nothing to configure: a node's side of the cluster PKI (pki.py), run against etcd.

- **First node** (no CA under the prefix, no join token): creates the cluster CA, keeps its key in
  `<data_root>/pki/ca/`, publishes the trust bundle and an empty CRL (put-if-absent: two first nodes
  racing end with one CA), makes the join secret, signs its own certificate. It is the *signer*.
- **Joining node** (a join token, or `security.trust_etcd`): takes the bundle from etcd only if the CA
  the token pins is in it and signed it, then writes a certificate request to `pki/csr/<node>` with an
  HMAC of the request under the token's secret. The signer checks the HMAC, signs, and answers in
  `pki/certs/<node>`; the node checks the certificate chains to the bundle and holds its own key.
- **Renewal**: at half of a certificate's lifetime (`security.cert_lifetime`, 30 days by default), or
  when the signing CA changed, a node requests a new certificate for a new key, proving itself with a
  signature by its current key; the signer refuses revoked and forgotten nodes. The signer renews its
  own directly. New certificates apply to new connections at once (pki.RotatingContext); no restart.
- **Forget**: the signer revokes every certificate it issued to the node (a new CRL per CA, published in
  `pki/crl`) and refuses the node's renewals and joins with the current token; members load the CRL
  within 2 s and refuse the node's certificate in the handshake, and requests on connections it
  opened before.
- **CA rotation**: a new CA is added to the bundle (trusted alongside the old one); once every live
  node has taken that bundle, the new CA becomes the signing one and every node renews; once every live
  node has a certificate of the new CA, the old CA leaves the bundle and its key is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import pki
from .meta import EtcdStore, EtcdUnavailable, dumps, record
from .pki import Bundle, PkiDir, PkiError

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 30.0  # how long a node waits for the signer to answer a certificate request
TICK = 0.5  # the signer reads requests this often
REFRESH = 2.0  # every node reads the trust bundle and the CRLs this often


def _hosts_of(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]


class ClusterPki:
    """This node's certificate, the cluster's trust and revocation state, and the signer's duties."""

    def __init__(self, *, node: str, data_root: str, lifetime: float, join_token: str = "",
                 trust_etcd: bool = False, require_client_cert: bool = False, hosts: Sequence[str] = ()) -> None:
        self.node = node
        self.files = PkiDir(data_root)
        self.lifetime = datetime.timedelta(seconds=lifetime)
        self.token = pki.parse_token(join_token) if join_token else None
        self.trust_etcd = trust_etcd
        self.require_client_cert = require_client_cert
        self.hosts = [h for h in hosts if h]
        self.bundle: Bundle | None = None
        self.crls: dict[str, x509.CertificateRevocationList] = {}  # CA fingerprint -> its CRL
        self.cert: x509.Certificate | None = None
        # Until this node has a certificate these refuse every handshake (no certificate, no CA to trust).
        self.server_ctx = pki.rotating(True, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        self.client_ctx = pki.rotating(False, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        self.revoked: frozenset[str] = frozenset()  # serials (upper-case hex) revoked by any trusted CA
        self.error = ""
        self.revoked_here = False
        self.renewals = 0
        self._store: EtcdStore | None = None
        self._trust_rev = 0
        self._crl_rev = 0
        self._reported: dict[str, Any] = {}
        self._logged: dict[str, float] = {}
        self._founded = False  # found_locally: the bundle is published once etcd runs
        # Awaited before this node reports that it trusts a new bundle: what else must load the trust first
        # (the embedded etcd member) does it here, so the signer never moves a rotation past a member that
        # would refuse the new CA's certificates.
        self.before_trust_report: Callable[[], Awaitable[None]] | None = None

    # ---- local state -----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.cert is not None and self.bundle is not None

    def load_local(self) -> bool:
        """Take the certificate and trust saved by an earlier run; True when this node can serve TLS now."""
        trust = self.files.read_json(self.files.trust_json, None)
        cert_raw, key_raw = self.files.read(self.files.node_cert), self.files.read(self.files.node_key)
        if not isinstance(trust, dict) or cert_raw is None or key_raw is None:
            return False
        try:
            bundle = Bundle.from_json(trust.get("bundle"))
            crls = self._crls_by_ca(bundle, [pki.load_crl(pem) for pem in trust.get("crls", [])])
            cert = pki.load_cert(cert_raw)
            key = pki.load_key(key_raw)
        except PkiError as exc:
            log.warning("ignoring the PKI state in %s: %s", self.files.dir, exc)
            return False
        if pki.common_name(cert) != self.node:
            # node_id changed on this data root: that certificate names another node; join again (token)
            log.warning("the certificate in %s is node %s's, not %s's: this node joins again with its join token",
                        self.files.dir, pki.common_name(cert), self.node)
            return False
        if not any(pki.issued_by(cert, ca) for ca in bundle.cas):
            log.warning("this node's certificate is not of a CA it trusts; it will ask for a new one")
        if not os.path.exists(self.files.identity) and key.public_key() == cert.public_key():
            self.files.write(self.files.identity, key_raw + cert_raw, 0o600)  # data roots of earlier versions
        if not os.path.exists(self.files.trust_cas):
            self.files.write(self.files.trust_cas, pki.ca_material(bundle), 0o644)
        self.bundle, self.crls, self.cert = bundle, crls, cert
        self._recompute_revoked()
        self._rebuild()
        return True

    def _save_trust(self) -> None:
        assert self.bundle is not None
        self.files.write_json(self.files.trust_json, {"bundle": self.bundle.to_json(),
                                                      "crls": [pki.crl_pem(c) for c in self.crls.values()]})
        self.files.write(self.files.trust_pem, pki.ssl_verify_material(self.bundle, list(self.crls.values())), 0o644)
        self.files.write(self.files.trust_cas, pki.ca_material(self.bundle), 0o644)

    def _rebuild(self) -> None:
        """New server and client contexts from the files: every connection from now on uses them."""
        if self.bundle is None or self.cert is None:
            return  # joining: contexts come with the certificate
        crl_check = all(pki.fingerprint(c) in self.crls for c in self.bundle.cas)
        server, client = pki.build_contexts(self.files.node_cert, self.files.node_key, self.files.trust_pem,
                                            crl_check=crl_check, require_client_cert=self.require_client_cert)
        self.server_ctx.current, self.client_ctx.current = server, client

    def _save_identity(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        # key first: a crash in between leaves an old certificate with a new key, which load_local refuses
        # at the handshake and the next start renews; never a certificate without its key.
        self.files.write(self.files.node_key, pki.key_pem(key), 0o600)
        self.files.write(self.files.node_cert, pki.cert_pem(cert).encode(), 0o644)
        self.files.write(self.files.identity, pki.key_pem(key) + pki.cert_pem(cert).encode(), 0o600)
        self.cert = cert

    def _joined(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        """A joining node's first certificate, of the bundle it took: saved, and used from now on."""
        assert self.bundle is not None
        self._save_trust()
        self._save_identity(key, cert)
        self._recompute_revoked()
        self._rebuild()
        log.info("joined the cluster: certificate %s from CA %s (signer %s), valid until %s",
                 pki.serial_hex(cert.serial_number), self.bundle.current[:16], self.bundle.signer,
                 cert.not_valid_after_utc.isoformat(timespec="seconds"))

    @classmethod
    def _crls_by_ca(cls, bundle: Bundle, crls: Sequence[x509.CertificateRevocationList]
                    ) -> dict[str, x509.CertificateRevocationList]:
        """The CRLs signed by a CA of the bundle, by that CA's fingerprint (the others are dropped)."""
        out = {}
        for crl in crls:
            ca = cls._issuer_of_crl(bundle, crl)
            if ca is not None:
                out[pki.fingerprint(ca)] = crl
        return out

    @staticmethod
    def _issuer_of_crl(bundle: Bundle, crl: x509.CertificateRevocationList) -> x509.Certificate | None:
        for ca in bundle.cas:
            # cryptography types public_key() as any certificate key (X25519, X448 too) and this argument as a
            # signing key: the cluster's CAs are EC keys (pki.py), and a wrong type would raise, not pass
            if ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        return None

    def _recompute_revoked(self) -> None:
        out: set[str] = set()
        for crl in self.crls.values():
            out.update(pki.serial_hex(r.serial_number) for r in crl)
        self.revoked = frozenset(out)
        mine = self.cert is not None and pki.serial_hex(self.cert.serial_number) in self.revoked
        if mine and not self.revoked_here:
            log.error("this node's certificate was revoked (`syncmesh-plugin forget %s` on another node): its peers "
                      "refuse it now", self.node)
        self.revoked_here = mine

    def _ca_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        if self.bundle is None:
            return None
        for ca in self.bundle.cas:
            if pki.issued_by(cert, ca):
                return ca
        return None

    # ---- status ----------------------------------------------------------------------------------------------
    def expires_in(self) -> float:
        if self.cert is None:
            return 0.0
        return (self.cert.not_valid_after_utc - pki.now()).total_seconds()

    @property
    def is_signer(self) -> bool:
        b = self.bundle
        return b is not None and b.signer == self.node and self.files.ca_key(b.current) is not None

    def health(self) -> dict[str, Any]:
        left = self.expires_in()
        out: dict[str, Any] = {"ok": self.ready and left > 0 and not self.revoked_here, "mode": "auto",
                               "error": self.error}
        if self.cert is not None:
            out["certificate_expires_in"] = round(left)
        if self.revoked_here:
            out["error"] = "this node's certificate was revoked (forgotten by the cluster)"
        elif self.ready and left <= 0:
            out["error"] = "this node's certificate expired; renewal: " + (self.error or "pending")
        return out

    def status(self) -> dict[str, Any]:
        b = self.bundle
        out: dict[str, Any] = {"node": self.node, "signer": b.signer if b else "", "is_signer": self.is_signer,
                               "trust_seq": b.seq if b else 0, "renewals": self.renewals, "error": self.error}
        if b is not None:
            out["cas"] = [{"fingerprint": pki.fingerprint(c), "subject": c.subject.rfc4514_string(),
                           "not_after": c.not_valid_after_utc.isoformat(), "signing": pki.fingerprint(c) == b.current,
                           "crl_number": pki.crl_number(self.crls[pki.fingerprint(c)])
                           if pki.fingerprint(c) in self.crls else None} for c in b.cas]
            out["rotation"] = ("none" if len(b.cas) == 1 else
                               "new CA trusted, waiting for every node" if b.current == pki.fingerprint(b.cas[0])
                               else "renewing with the new CA")
        if self.cert is not None:
            out["certificate"] = {"serial": pki.serial_hex(self.cert.serial_number),
                                  "not_before": self.cert.not_valid_before_utc.isoformat(),
                                  "not_after": self.cert.not_valid_after_utc.isoformat(),
                                  "ca": pki.fingerprint(ca) if (ca := self._ca_of(self.cert)) else "",
                                  "revoked": self.revoked_here}
        return out

    def _note(self, msg: str, level: int = logging.WARNING, every: float = 30.0) -> None:
        """Log a recurring problem at most once every `every` seconds."""
        self.error = msg
        t = time.monotonic()
        if t - self._logged.get(msg, -every) >= every:
            self._logged[msg] = t
            log.log(level, "%s", msg)

    # ---- joining ---------------------------------------------------------------------------------------------
    async def bootstrap(self, store: EtcdStore) -> None:
        """Make sure this node has a certificate of the cluster's CA; raises PkiError (retried by the caller)
        while it cannot, with what the operator has to do."""
        self._store = store
        kv = await store.trust_bundle()
        if self.cert is not None and self.bundle is not None:
            if kv is None and self.is_signer:
                await self._publish_bundle(self.bundle, create=True)
                await self._publish_crls()
                if self._founded:
                    self._founded = False  # the CA made before the embedded etcd started: now in etcd
                else:
                    log.warning("the trust bundle was missing from etcd: published this node's again")
            await self.refresh()
            return
        if kv is None:
            if self.token is not None:
                raise PkiError("no cluster CA in etcd yet: this node has a join token, so it waits for the node "
                               "that printed the token (same etcd endpoints and prefix?)")
            await self._create_cluster()
            return
        try:
            bundle = Bundle.from_json(json.loads(kv.value))
        except (ValueError, PkiError) as exc:
            raise PkiError(f"the trust bundle in etcd is unreadable ({exc}); refusing to join") from None
        if self.token is not None:
            if not pki.accept_with_token(bundle, self.token):
                raise PkiError("the cluster CA in etcd does not match the join token (a token of another cluster, or "
                               "the CA was rotated since: run `syncmesh-plugin token` on the signer "
                               f"{bundle.signer} for the current one)")
            kind = "join"
        elif self.trust_etcd:
            if not bundle.self_consistent():
                raise PkiError("the trust bundle in etcd is not signed by its own CAs; refusing to join")
            kind = "etcd"
        else:
            raise PkiError(f"this cluster already has a CA (created by node {bundle.signer}); to join it, run "
                           f"`syncmesh-plugin token` on {bundle.signer} and give this node the token (join_token, "
                           "SYNCMESH_JOIN_TOKEN)")
        self.bundle = bundle
        self.crls = {}
        await self.refresh_crls(force=True)
        key = pki.new_key()
        csr = pki.make_csr(key, self.node, self.hosts)
        der = pki.csr_der(csr)
        proof: dict[str, Any] = {"kind": kind}
        if kind == "join":
            assert self.token is not None
            proof["hmac"] = pki.join_proof(self.token.secret, self.node, der)
        cert = await self._request(csr, proof, key)
        self._joined(key, cert)

    async def _create_cluster(self) -> None:
        assert self._store is not None
        ca_cert, ca_key = pki.new_ca(f"syncmesh cluster CA {secrets.token_hex(4)}")
        fp = self.files.save_ca(ca_cert, ca_key)
        bundle = Bundle(1, [ca_cert], fp, self.node).sign({fp: ca_key})
        created, _ = await self._store.create_trust_bundle(json.dumps(bundle.to_json()).encode())
        if not created:
            self.files.drop_ca_key(fp)
            raise PkiError("another node created the cluster CA at the same moment; this node needs its join token")
        self.bundle = bundle
        self.crls = {fp: pki.make_crl(ca_cert, ca_key, [], 1)}
        await self._publish_crls()
        self._write_join_token(pki.new_secret())
        self._save_trust()
        self._sign_own()
        log.warning("created the cluster CA %s; this node signs the other nodes' certificates. Other nodes join "
                    "with the token `syncmesh-plugin token` prints here (join_token / SYNCMESH_JOIN_TOKEN)", fp[:16])

    def _write_join_token(self, secret: str) -> None:
        assert self.bundle is not None
        self.files.write(self.files.join_secret, secret.encode() + b"\n")
        self.files.write(self.files.join_token, pki.make_token(self.bundle.current, secret).encode() + b"\n")

    def join_token(self) -> str:
        raw = self.files.read(self.files.join_token)
        return raw.decode().strip() if raw else ""

    def _join_secret(self) -> str:
        raw = self.files.read(self.files.join_secret)
        return raw.decode().strip() if raw else ""

    def _sign_own(self) -> None:
        """The signer issues its own certificates directly."""
        assert self.bundle is not None
        ca_key = self.files.ca_key(self.bundle.current)
        ca = self.bundle.ca(self.bundle.current)
        assert ca_key is not None and ca is not None
        key = pki.new_key()
        cert = pki.sign_request(ca, ca_key, pki.make_csr(key, self.node, self.hosts), self.node, self.hosts,
                                self.lifetime)
        self._record_issued(self.node, cert)
        self._save_identity(key, cert)
        self._recompute_revoked()
        self._rebuild()

    async def _request(self, csr: x509.CertificateSigningRequest, proof: dict[str, Any],
                       key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        """Write the request to etcd and wait for the signer's answer."""
        assert self.bundle is not None
        cert = pki.load_cert(await self._ask_signer(self.node, {"csr": pki.csr_pem(csr), "proof": proof}))
        if cert.public_key() != key.public_key() or pki.common_name(cert) != self.node:
            raise PkiError("the signer's answer is not a certificate of this node's key")
        ca = self.bundle.ca(self.bundle.current)
        if ca is None or not pki.issued_by(cert, ca):
            # the bundle may have moved on meanwhile (rotation): any CA we trust will do
            if self._ca_of(cert) is None:
                raise PkiError("the signer's answer is not signed by a CA of the cluster")
        return cert

    async def _ask_signer(self, node: str, rec: dict[str, Any]) -> str:
        """Put `node`'s request (csr, proof) in etcd and wait for the signer's answer: the certificate (PEM)."""
        assert self._store is not None and self.bundle is not None
        req = secrets.token_hex(8)
        await self._store.put_cert_request(node, dumps({**rec, "req": req, "at": time.time()}))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            kv = await self._store.cert_answer(node)
            ans = record(kv.value) if kv is not None else None
            if ans is None or ans.get("req") != req:
                continue
            if "error" in ans:
                raise PkiError(f"the signer ({self.bundle.signer}) refused the certificate request of {node}: "
                               f"{str(ans['error'])[:300]}")
            return str(ans.get("cert", ""))
        raise PkiError(f"no answer to the certificate request of {node} within {ANSWER_TIMEOUT:.0f}s: is the signer "
                       f"({self.bundle.signer}) running and connected to etcd?")

    # ---- an embedded etcd cluster: its members serve with the cluster's certificates, so the founder makes
    # the CA before its member starts, and a joining host gets its certificate through the API it joins by
    def found_locally(self) -> None:
        """The first node of an embedded etcd makes the cluster's CA and its own certificate before its member
        starts (the member serves TLS with them); bootstrap publishes the trust bundle once etcd runs."""
        ca_cert, ca_key = pki.new_ca(f"syncmesh cluster CA {secrets.token_hex(4)}")
        fp = self.files.save_ca(ca_cert, ca_key)
        self.bundle = Bundle(1, [ca_cert], fp, self.node).sign({fp: ca_key})
        self.crls = {fp: pki.make_crl(ca_cert, ca_key, [], 1)}
        self._write_join_token(pki.new_secret())
        self._save_trust()
        self._sign_own()
        self._founded = True
        log.warning("created the cluster CA %s; this node signs the other nodes' certificates. Other hosts join "
                    "with SYNCMESH_JOIN and the token `syncmesh-plugin token` prints here (SYNCMESH_JOIN_TOKEN)",
                    fp[:16])

    def join_request(self) -> tuple[ec.EllipticCurvePrivateKey, dict[str, str]]:
        """A new key and what a joining host sends with its join: the request and the join token's proof."""
        if self.token is None:
            raise PkiError("joining an embedded etcd cluster under TLS needs the cluster's join token: run "
                           "`syncmesh-plugin token` on a node of the cluster and give it to this node "
                           "(join_token / SYNCMESH_JOIN_TOKEN)")
        key = pki.new_key()
        csr = pki.make_csr(key, self.node, self.hosts)
        return key, {"csr": pki.csr_pem(csr), "hmac": pki.join_proof(self.token.secret, self.node, pki.csr_der(csr))}

    async def sign_joiner(self, node: str, csr_pem: Any, hmac: Any) -> dict[str, Any]:
        """The node asked to let `node` join: its certificate (the signer checks the join token's proof) and the
        cluster's trust, which the joiner checks against its token."""
        if not isinstance(csr_pem, str) or not isinstance(hmac, str) or self.bundle is None:
            raise PkiError("a join under TLS carries a certificate request and the join token's proof (csr, hmac)")
        rec = {"csr": csr_pem, "proof": {"kind": "join", "hmac": hmac}}
        cert = self.decide(node, rec)["cert"] if self.is_signer else await self._ask_signer(node, rec)
        return {"cert": cert, "bundle": self.bundle.to_json(), "crls": [pki.crl_pem(c) for c in self.crls.values()]}

    def adopt(self, answer: dict[str, Any], key: ec.EllipticCurvePrivateKey, *, server_cert: bytes | None) -> None:
        """The joiner's side: take the certificate and trust the node asked answered with, once they check out
        against the join token (the CA it names) and this node's key."""
        assert self.token is not None
        try:
            bundle = Bundle.from_json(answer.get("bundle"))
            cert = pki.load_cert(str(answer.get("cert", "")))
            crls = [pki.load_crl(p) for p in answer.get("crls", []) if isinstance(p, str)]
        except (PkiError, ValueError, TypeError) as exc:
            raise PkiError(f"the join answer's certificate or trust is unreadable ({exc})") from None
        if not pki.accept_with_token(bundle, self.token):
            raise PkiError("the CA of the cluster asked does not match the join token (a token of another cluster, "
                           "or the CA was rotated since: get the current one with `syncmesh-plugin token`)")
        if cert.public_key() != key.public_key() or pki.common_name(cert) != self.node:
            raise PkiError("the join answer's certificate is not one of this node's key")
        if not any(pki.issued_by(cert, ca) for ca in bundle.cas):
            raise PkiError("the join answer's certificate is not signed by the cluster's CA")
        if server_cert is None or not self._trusted_by(bundle, server_cert):
            raise PkiError("the node asked to join served a certificate that is not of the cluster's CA (the CA "
                           "the join token names): refusing its answer")
        self.bundle = bundle
        self.crls = self._crls_by_ca(bundle, crls)
        self._joined(key, cert)

    @staticmethod
    def _trusted_by(bundle: Bundle, der: bytes) -> bool:
        """A certificate (DER) issued by a CA of the bundle."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        return any(pki.issued_by(cert, ca) for ca in bundle.cas)

    # ---- keeping current -------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        await self.refresh_trust()
        await self.refresh_crls()

    async def refresh_trust(self) -> None:
        assert self._store is not None and self.bundle is not None
        kv = await self._store.trust_bundle()
        if kv is None or kv.mod_revision == self._trust_rev:
            return
        self._trust_rev = kv.mod_revision
        try:
            new = Bundle.from_json(json.loads(kv.value))
        except (ValueError, PkiError) as exc:
            self._note(f"ignored an unreadable trust bundle in etcd: {exc}")
            return
        if new.seq <= self.bundle.seq:
            return
        if not pki.accept_update(self.bundle, new):
            self._note("ignored a trust bundle in etcd that no CA this node trusts signed (someone who can write "
                       "etcd tried to plant a CA?)", logging.ERROR)
            return
        self.bundle = new
        keep = set(new.fingerprints())
        self.crls = {fp: c for fp, c in self.crls.items() if fp in keep}
        self._save_trust()
        self._recompute_revoked()
        self._rebuild()
        log.info("trust bundle %d: CAs %s, signing with %s", new.seq, ", ".join(fp[:16] for fp in keep),
                 new.current[:16])
        await self.refresh_crls(force=True)

    async def refresh_crls(self, force: bool = False) -> None:
        assert self._store is not None and self.bundle is not None
        kv = await self._store.revocation_lists()
        if kv is None or (kv.mod_revision == self._crl_rev and not force):
            return
        self._crl_rev = kv.mod_revision
        rec = record(kv.value) or {}
        changed = False
        for pem in rec.get("crls", []) if isinstance(rec.get("crls"), list) else []:
            try:
                crl = pki.load_crl(pem)
            except PkiError:
                continue
            ca = self._issuer_of_crl(self.bundle, crl)
            if ca is None:
                continue
            fp = pki.fingerprint(ca)
            have = self.crls.get(fp)
            if have is not None and (pki.crl_number(crl) <= pki.crl_number(have)):
                continue  # never an older list: whoever writes etcd cannot undo a revocation
            self.crls[fp] = crl
            changed = True
        if changed:
            self._save_trust()
            self._recompute_revoked()
            self._rebuild()

    def renewal_due(self) -> bool:
        if self.cert is None or self.bundle is None or self.revoked_here:
            return False
        # Certificates are back-dated by BACKDATE for clock skew: their nominal lifetime starts after it. Renew
        # once less than half of it is left (of ours, if the signer was configured with a longer one).
        nb, na = self.cert.not_valid_before_utc, self.cert.not_valid_after_utc
        nominal = min(na - nb - pki.BACKDATE, self.lifetime)
        if na - pki.now() <= nominal / 2:
            return True
        ca = self.bundle.ca(self.bundle.current)
        return ca is not None and not pki.issued_by(self.cert, ca)

    async def renew(self) -> None:
        assert self.bundle is not None and self.cert is not None
        if self.is_signer:
            self._sign_own()
        else:
            key_raw = self.files.read(self.files.node_key)
            if key_raw is None:
                raise PkiError("this node's key is missing")
            old_key = pki.load_key(key_raw)
            key = pki.new_key()
            csr = pki.make_csr(key, self.node, self.hosts)
            der = pki.csr_der(csr)
            proof = {"kind": "renew", "cert": pki.cert_pem(self.cert), "sig": pki.renew_proof(old_key, self.node, der)}
            try:
                cert = await self._request(csr, proof, key)
            except PkiError:
                if self.token is None or self._ca_of(self.cert) is not None:
                    raise
                # our certificate's CA left the bundle while we were away: join again with the token
                proof = {"kind": "join", "hmac": pki.join_proof(self.token.secret, self.node, der)}
                cert = await self._request(csr, proof, key)
            self._save_identity(key, cert)
            self._recompute_revoked()
            self._rebuild()
        self.renewals += 1
        assert self.cert is not None
        log.info("certificate renewed: %s, valid until %s", pki.serial_hex(self.cert.serial_number),
                 self.cert.not_valid_after_utc.isoformat(timespec="seconds"))

    async def _report(self) -> None:
        """This node's PKI state in etcd: what the signer waits for during a CA rotation."""
        assert self._store is not None and self.bundle is not None and self.cert is not None
        ca = self._ca_of(self.cert)
        rec = {"trust_seq": self.bundle.seq, "ca": pki.fingerprint(ca) if ca else "",
               "serial": pki.serial_hex(self.cert.serial_number),
               "not_after": self.cert.not_valid_after_utc.timestamp()}
        if rec != self._reported:
            if rec["trust_seq"] != self._reported.get("trust_seq") and self.before_trust_report is not None:
                await self.before_trust_report()
            await self._store.put_pki_state(self.node, rec)
            self._reported = rec

    async def run(self) -> None:
        """Every node: follow the bundle and the CRLs, renew when due, report; the signer also answers
        requests and moves a CA rotation along."""
        last_refresh = 0.0
        while True:
            try:
                if time.monotonic() - last_refresh >= REFRESH:
                    last_refresh = time.monotonic()
                    await self.refresh()
                    if self.renewal_due():
                        await self.renew()
                    await self._report()
                    if self.is_signer:
                        await self._advance_rotation()
                if self.is_signer:
                    await self.serve_requests()
                self.error = ""
            except asyncio.CancelledError:
                raise
            except (EtcdUnavailable, PkiError, OSError) as exc:
                self._note(f"PKI: {exc}")
            await asyncio.sleep(TICK)

    # ---- the signer --------------------------------------------------------------------------------------------
    def _forgotten(self) -> set[str]:
        v = self.files.read_json(self.files.forgotten, [])
        return {str(x) for x in v} if isinstance(v, list) else set()

    def _record_issued(self, node: str, cert: x509.Certificate) -> None:
        issued = self.files.read_json(self.files.issued, {})
        if not isinstance(issued, dict):
            issued = {}
        t = time.time()
        ca = self._ca_of(cert)
        rows = [r for r in issued.get(node, []) if isinstance(r, list) and len(r) == 3 and r[1] > t]
        rows.append([pki.serial_hex(cert.serial_number), cert.not_valid_after_utc.timestamp(),
                     pki.fingerprint(ca) if ca else ""])
        issued[node] = rows
        self.files.write_json(self.files.issued, issued)

    async def serve_requests(self) -> None:
        assert self._store is not None
        for node, kv in await self._store.cert_requests():
            rec = record(kv.value) or {}
            try:
                ans = self.decide(node, rec)
            except PkiError as exc:
                ans = {"error": str(exc)}
                log.warning("refused the certificate request of %s: %s", node[:63], exc)
            ans["req"] = str(rec.get("req", ""))[:32]
            with contextlib.suppress(ValueError):
                pki.check_node_name(node)
                await self._store.put_cert_answer(node, dumps(ans))
            await self._store.delete_cert_request(node, kv.mod_revision)

    def decide(self, node: str, rec: dict[str, Any]) -> dict[str, Any]:
        """Check one request and sign it, or raise PkiError saying why not."""
        assert self.bundle is not None
        try:
            pki.check_node_name(node)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        csr = pki.load_csr(rec.get("csr"))
        if pki.common_name(csr) != node:
            raise PkiError("the request names another node")
        der = pki.csr_der(csr)
        raw_proof = rec.get("proof")
        proof: dict[str, Any] = raw_proof if isinstance(raw_proof, dict) else {}
        kind = proof.get("kind")
        forgotten = node in self._forgotten()
        if kind == "join":
            if forgotten:
                raise PkiError(f"node {node} was forgotten; it can join again after `syncmesh-plugin token --rotate`"
                               " with the new token, or under another node id")
            secret = self._join_secret()
            if not secret or not pki.check_join_proof(secret, node, der, proof.get("hmac")):
                raise PkiError("the join token's secret is wrong (or the token was rotated): get the current token "
                               f"with `syncmesh-plugin token` on {self.node}")
        elif kind == "renew":
            old = pki.load_cert(str(proof.get("cert", "")))
            if pki.common_name(old) != node:
                raise PkiError("the renewal proof is another node's certificate")
            if self._ca_of(old) is None:
                raise PkiError("the certificate to renew is not of a CA the cluster trusts now; join again with the "
                               "current token")
            if forgotten or pki.serial_hex(old.serial_number) in self.revoked:
                raise PkiError(f"node {node} was forgotten: its certificate is revoked and is not renewed")
            if not pki.check_renew_proof(old, node, der, proof.get("sig")):
                raise PkiError("the renewal proof does not verify")
        elif kind == "etcd":
            if not self.trust_etcd:
                raise PkiError("this cluster admits nodes with a join token only (security.trust_etcd is off on the "
                               "signer)")
            if forgotten:
                raise PkiError(f"node {node} was forgotten")
        else:
            raise PkiError("unknown kind of certificate request")
        ca = self.bundle.ca(self.bundle.current)
        ca_key = self.files.ca_key(self.bundle.current)
        if ca is None or ca_key is None:
            raise PkiError("this node does not hold the signing CA's key")
        cert = pki.sign_request(ca, ca_key, csr, node, _hosts_of(csr), self.lifetime)
        self._record_issued(node, cert)
        log.info("issued certificate %s to %s (%s), valid until %s", pki.serial_hex(cert.serial_number), node, kind,
                 cert.not_valid_after_utc.isoformat(timespec="seconds"))
        return {"cert": pki.cert_pem(cert), "ca": self.bundle.current}

    def _require_signer(self) -> Bundle:
        if self.bundle is None or not self.is_signer:
            signer = self.bundle.signer if self.bundle else "?"
            raise NotSigner(signer)
        return self.bundle

    async def _publish_bundle(self, bundle: Bundle, create: bool = False) -> None:
        assert self._store is not None
        keys = {fp: k for fp in bundle.fingerprints() if (k := self.files.ca_key(fp)) is not None}
        bundle.sign(keys)
        raw = json.dumps(bundle.to_json()).encode()
        if create:
            await self._store.create_trust_bundle(raw)
        else:
            await self._store.put_trust_bundle(raw)

    async def _publish_crls(self) -> None:
        assert self._store is not None
        await self._store.put_revocation_lists(dumps({"crls": [pki.crl_pem(c) for c in self.crls.values()]}))

    async def forget(self, node: str) -> dict[str, Any]:
        """Revoke every certificate issued to `node`, refuse its renewals and joins with the current token."""
        bundle = self._require_signer()
        assert self._store is not None
        pki.check_node_name(node)
        if node == self.node:
            raise PkiError("the signer cannot forget itself")
        forgotten = self._forgotten() | {node}
        self.files.write_json(self.files.forgotten, sorted(forgotten))
        issued = self.files.read_json(self.files.issued, {})
        rows = [r for r in (issued.get(node, []) if isinstance(issued, dict) else []) if isinstance(r, list)]
        revoked: list[str] = []
        for ca in bundle.cas:
            fp = pki.fingerprint(ca)
            key = self.files.ca_key(fp)
            if key is None:
                continue
            old = self.crls.get(fp)
            serials = {r.serial_number for r in old} if old is not None else set()
            mine = {int(r[0], 16) for r in rows if r[2] == fp and r[1] > time.time()}
            revoked += [pki.serial_hex(s) for s in sorted(mine - serials)]
            self.crls[fp] = pki.make_crl(ca, key, serials | mine, (pki.crl_number(old) if old is not None else 0) + 1)
        await self._publish_crls()
        self._save_trust()
        self._recompute_revoked()
        self._rebuild()
        with contextlib.suppress(EtcdUnavailable):
            await self._store.delete_cert_answer(node)
            await self._store.delete_pki_state(node)
        log.warning("node %s forgotten: %d certificate(s) revoked, its renewals refused", node, len(revoked))
        return {"node": node, "revoked_serials": revoked,
                "crl_numbers": {fp[:16]: pki.crl_number(c) for fp, c in self.crls.items()}}

    async def rotate_token(self) -> str:
        """A new join secret: tokens printed before stop working; forgotten nodes may join again with the new."""
        self._require_signer()
        self._write_join_token(pki.new_secret())
        self.files.write_json(self.files.forgotten, [])
        log.warning("join token rotated: earlier tokens no longer admit nodes")
        return self.join_token()

    async def rotate_ca(self) -> dict[str, Any]:
        """Start a CA rotation: a new CA trusted alongside the old one."""
        bundle = self._require_signer()
        if len(bundle.cas) > 1:
            raise PkiError("a CA rotation is already in progress")
        ca_cert, ca_key = pki.new_ca(f"syncmesh cluster CA {secrets.token_hex(4)}")
        fp = self.files.save_ca(ca_cert, ca_key)
        self.crls[fp] = pki.make_crl(ca_cert, ca_key, [], 1)
        await self._publish_crls()  # before the bundle: a node trusting the new CA finds its CRL at once
        new = Bundle(bundle.seq + 1, [*bundle.cas, ca_cert], bundle.current, self.node)
        await self._publish_bundle(new)
        self.bundle = new
        self._save_trust()
        self._rebuild()
        log.warning("CA rotation started: new CA %s trusted alongside %s", fp[:16], bundle.current[:16])
        return {"new_ca": fp, "old_ca": bundle.current, "trust_seq": new.seq}

    async def _advance_rotation(self) -> None:
        b = self.bundle
        if b is None or len(b.cas) < 2 or self._store is None:
            return
        live = set(await self._store.node_records())
        states = await self._store.pki_states()
        old_fp, new_fp = b.fingerprints()[0], b.fingerprints()[-1]

        def done(n: str, need_ca: str | None) -> bool:
            s = states.get(n, {})
            return int(s.get("trust_seq", 0) or 0) >= b.seq and (need_ca is None or s.get("ca") == need_ca)

        if b.current == old_fp:
            if all(done(n, None) for n in live | {self.node}):
                nb = Bundle(b.seq + 1, b.cas, new_fp, self.node)
                await self._publish_bundle(nb)
                self.bundle = nb
                self._write_join_token(self._join_secret())
                self._save_trust()
                self._sign_own()
                self.renewals += 1
                log.warning("CA rotation: every node trusts the new CA %s; it signs from now on", new_fp[:16])
        elif all(done(n, new_fp) for n in live | {self.node}):
            nb = Bundle(b.seq + 1, [c for c in b.cas if pki.fingerprint(c) == new_fp], new_fp, self.node)
            await self._publish_bundle(nb)
            self.bundle = nb
            self.crls = {fp: c for fp, c in self.crls.items() if fp == new_fp}
            await self._publish_crls()
            self._save_trust()
            self._recompute_revoked()
            self._rebuild()
            self.files.drop_ca_key(old_fp)
            log.warning("CA rotation complete: every node has a certificate of %s; the old CA %s is no longer "
                        "trusted and its key was deleted", new_fp[:16], old_fp[:16])


class NotSigner(PkiError):
    """A signer's operation asked of another node."""

    def __init__(self, signer: str) -> None:
        super().__init__(f"this node does not hold the cluster CA: ask the signer, node {signer}")
        self.signer = signer


class PkiApi:
    """What the API asks of the PKI; the signer's operations are forwarded to the signer over mutual TLS."""

    def __init__(self, p: ClusterPki, session: Callable[[], aiohttp.ClientSession | None],
                 nodes: Callable[[], Awaitable[dict[str, dict[str, Any]]]]) -> None:
        self.pki = p
        self._session = session
        self._nodes = nodes

    def status(self) -> dict[str, Any]:
        return self.pki.status()

    async def cluster_status(self) -> dict[str, Any]:
        out = self.pki.status()
        store = self.pki._store
        if store is not None:
            with contextlib.suppress(EtcdUnavailable):
                live = await self._nodes()
                states = await store.pki_states()
                out["nodes"] = {n: {**rec, "live": n in live} for n, rec in sorted(states.items())}
        return out

    async def _at_signer(self, path: str) -> dict[str, Any]:
        b = self.pki.bundle
        if b is None:
            raise PkiError("this node has not joined the cluster's PKI yet")
        if b.signer == self.pki.node:
            raise PkiError("this node was the signer but its CA key is gone from its data root")
        session = self._session()
        rec = (await self._nodes()).get(b.signer)
        url = rec.get("advertise") if rec else None
        if session is None or not isinstance(url, str) or not url.startswith("https://"):
            raise PkiError(f"the signer, node {b.signer}, is not live: it holds the CA key")
        try:
            async with session.post(url + path, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PkiError(f"cannot reach the signer {b.signer} at {url}: {type(exc).__name__}") from None
        if resp.status != 200:
            raise PkiError(str(body.get("error", body) if isinstance(body, dict) else body))
        return dict(body) if isinstance(body, dict) else {"result": body}

    async def revoke(self, node: str) -> dict[str, Any]:
        try:
            pki.check_node_name(node)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        if self.pki.is_signer:
            return await self.pki.forget(node)
        return await self._at_signer(f"/api/v1/pki/nodes/{node}/revoke")

    async def rotate_ca(self) -> dict[str, Any]:
        if self.pki.is_signer:
            return await self.pki.rotate_ca()
        return await self._at_signer("/api/v1/pki/ca/rotate")

    async def rotate_token(self) -> dict[str, Any]:
        if self.pki.is_signer:
            return {"join_token": await self.pki.rotate_token()}
        return await self._at_signer("/api/v1/pki/join-token/rotate")

    async def sign_joiner(self, node: str, csr_pem: Any, hmac: Any) -> dict[str, Any]:
        return await self.pki.sign_joiner(node, csr_pem, hmac)


def api_credentials(data_root: str) -> tuple[str, str, str] | None:
    """(certificate, key, trust file) of the node whose data root this is, if they can be read (root). The
    certificate and key come from the one identity file when there is one (a renewal replaces it whole)."""
    files = PkiDir(data_root)
    paths = (files.node_cert, files.node_key, files.trust_pem)
    if os.path.exists(files.identity):
        paths = (files.identity, files.identity, files.trust_pem)
    try:
        for p in paths:
            with open(p, "rb"):
                pass
    except OSError:
        return None
    return paths

