"""The cluster PKI (pki.py, autotls.ClusterPki.decide): join tokens, proofs, the trust bundle, CRLs, and real
TLS handshakes with the contexts members use (no etcd: the signer's decisions are pure)."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from syncmesh_plugin import pki
from syncmesh_plugin.autotls import ClusterPki
from syncmesh_plugin.pki import Bundle, PkiError

# ---- join token ---------------------------------------------------------------------------------------------


def test_token_round_trip_and_shape() -> None:
    ca, _ = pki.new_ca()
    secret = pki.new_secret()
    tok = pki.make_token(pki.fingerprint(ca), secret)
    assert tok.startswith("SM1") and len(tok) == 3 + 64 + 2 + 43
    parsed = pki.parse_token(tok)
    assert parsed.ca_fingerprint == pki.fingerprint(ca) and parsed.secret == secret
    assert secret not in repr(parsed)  # never in a log line through repr


@pytest.mark.parametrize("bad", ["", "SM1", "SM2" + "a" * 64 + "::" + "s" * 43, "SM1" + "A" * 64 + "::" + "s" * 43,
                                 "SM1" + "a" * 64 + ":" + "s" * 43, "SM1" + "a" * 64 + "::short",
                                 "SM1" + "a" * 64 + "::" + "s" * 42 + "!"])
def test_malformed_tokens_are_refused_without_being_repeated(bad: str) -> None:
    with pytest.raises(PkiError) as ei:
        pki.parse_token(bad)
    assert (bad[3:] or "@@") not in str(ei.value)


# ---- proofs -------------------------------------------------------------------------------------------------


def test_join_proof_binds_secret_node_and_request() -> None:
    key = pki.new_key()
    der = pki.csr_der(pki.make_csr(key, "n2", ["10.0.0.2"]))
    other = pki.csr_der(pki.make_csr(pki.new_key(), "n2"))
    secret = pki.new_secret()
    proof = pki.join_proof(secret, "n2", der)
    assert pki.check_join_proof(secret, "n2", der, proof)
    assert not pki.check_join_proof(pki.new_secret(), "n2", der, proof)
    assert not pki.check_join_proof(secret, "n3", der, proof)
    assert not pki.check_join_proof(secret, "n2", other, proof)
    assert not pki.check_join_proof(secret, "n2", der, None)


def test_renew_proof_needs_the_current_key() -> None:
    ca, ca_key = pki.new_ca()
    key = pki.new_key()
    cert = pki.sign_request(ca, ca_key, pki.make_csr(key, "n2"), "n2", [], datetime.timedelta(days=1))
    der = pki.csr_der(pki.make_csr(pki.new_key(), "n2"))
    assert pki.check_renew_proof(cert, "n2", der, pki.renew_proof(key, "n2", der))
    assert not pki.check_renew_proof(cert, "n2", der, pki.renew_proof(pki.new_key(), "n2", der))
    assert not pki.check_renew_proof(cert, "n3", der, pki.renew_proof(key, "n2", der))
    assert not pki.check_renew_proof(cert, "n2", der, "not base64!")


# ---- the trust bundle ---------------------------------------------------------------------------------------


def _bundle(seq: int, cas: list[tuple[x509.Certificate, Any]], current: int = 0) -> Bundle:
    b = Bundle(seq, [c for c, _ in cas], pki.fingerprint(cas[current][0]), "n1")
    return b.sign({pki.fingerprint(c): k for c, k in cas})


def test_bundle_accepted_with_the_pinned_ca_only() -> None:
    a, b = pki.new_ca(), pki.new_ca()
    bundle = Bundle.from_json(_bundle(1, [a]).to_json())  # through JSON, as from etcd
    tok = pki.parse_token(pki.make_token(pki.fingerprint(a[0]), pki.new_secret()))
    assert pki.accept_with_token(bundle, tok)
    assert not pki.accept_with_token(_bundle(1, [b]), tok)  # another cluster's CA
    # a bundle listing the pinned CA but not signed by it (someone who can write etcd, without the CA key)
    forged = Bundle(1, [a[0], b[0]], pki.fingerprint(b[0]), "evil").sign({pki.fingerprint(b[0]): b[1]})
    assert not pki.accept_with_token(forged, tok)
    tampered = _bundle(1, [a])
    tampered.signer = "evil"  # payload changed after signing
    assert not pki.accept_with_token(tampered, tok)


def test_bundle_updates_need_a_trusted_signature_and_a_higher_seq() -> None:
    a, b, evil = pki.new_ca(), pki.new_ca(), pki.new_ca()
    cur = _bundle(3, [a])
    assert pki.accept_update(cur, _bundle(4, [a, b]))  # rotation: signed by a (and b)
    assert pki.accept_update(_bundle(4, [a, b]), _bundle(5, [b]))  # end of rotation, trusted b signs
    assert not pki.accept_update(cur, _bundle(3, [a]))  # not newer
    assert not pki.accept_update(cur, _bundle(2, [a, b]))  # rollback
    assert not pki.accept_update(cur, _bundle(9, [evil]))  # planted CA
    assert not pki.accept_update(cur, _bundle(9, [evil, b]))


def test_bundle_rejects_non_ca_certificates_and_garbage() -> None:
    ca, key = pki.new_ca()
    leaf = pki.sign_request(ca, key, pki.make_csr(pki.new_key(), "n1"), "n1", [], datetime.timedelta(days=1))
    obj = _bundle(1, [(ca, key)]).to_json()
    obj["cas"] = [pki.cert_pem(leaf)]
    obj["current"] = pki.fingerprint(leaf)
    with pytest.raises(PkiError, match="not a CA"):
        Bundle.from_json(obj)
    for bad in (None, [], {"v": 2}, {"v": 1, "seq": "1"}, {**_bundle(1, [(ca, key)]).to_json(), "current": "00"}):
        with pytest.raises(PkiError):
            Bundle.from_json(bad)


# ---- real handshakes ----------------------------------------------------------------------------------------


class Member:
    """A member's files (certificate, key, trust.pem with CAs and CRLs) in a directory."""

    def __init__(self, d: Path, name: str, ca: tuple[x509.Certificate, Any], crls: list[Any] | None = None,
                 trust: list[x509.Certificate] | None = None) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.key = pki.new_key()
        self.cert = pki.sign_request(ca[0], ca[1], pki.make_csr(self.key, name), name, [], datetime.timedelta(days=1))
        self.cert_file, self.key_file, self.trust = d / f"{name}.pem", d / f"{name}-key.pem", d / f"{name}-trust.pem"
        self.cert_file.write_text(pki.cert_pem(self.cert))
        self.key_file.write_bytes(pki.key_pem(self.key))
        self.write_trust(trust or [ca[0]], crls or [pki.make_crl(ca[0], ca[1], [], 1)])

    def write_trust(self, cas: list[x509.Certificate], crls: list[Any]) -> None:
        self.trust.write_bytes(pki.ssl_verify_material(Bundle(1, cas, pki.fingerprint(cas[0]), "x"), crls))

    def contexts(self, require: bool = False) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        return pki.build_contexts(str(self.cert_file), str(self.key_file), str(self.trust), crl_check=True,
                                  require_client_cert=require)


async def _exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """Connect, have the server answer with the client's certificate CN; raise when the handshake fails."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peercert")
        cn = dict(x[0] for x in peer["subject"])["commonName"] if peer else "-"
        w.write(cn.encode() + b"\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        line = await asyncio.wait_for(r.readline(), 5)
        w.close()
        if not line:
            raise ConnectionError("closed by the server")
        return line.decode().strip()
    finally:
        server.close()
        await server.wait_closed()


def _client(member: Member | None, trust: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(trust))
    if member is not None:
        ctx.load_cert_chain(str(member.cert_file), str(member.key_file))
    return ctx


def test_handshakes_members_strangers_revoked_and_anonymous(tmp_path: Path) -> None:
    ca, other = pki.new_ca(), pki.new_ca()
    server = Member(tmp_path, "n1", ca)
    member, stranger = Member(tmp_path, "n2", ca), Member(tmp_path, "x", other)
    doomed = Member(tmp_path, "n3", ca)
    srv, cli = server.contexts()

    async def run() -> None:
        assert await _exchange(srv, member.contexts()[1]) == "n2"  # both ways: a member's client context
        assert await _exchange(srv, _client(None, server.trust)) == "-"  # anonymous: the API then wants a token
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await _exchange(srv, _client(stranger, server.trust))  # another CA: refused in the handshake
        strict, _ = server.contexts(require=True)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await _exchange(strict, _client(None, server.trust))  # client_cert_required: no certificate, no entry
        # the member's client refuses a server of another CA
        with pytest.raises(ssl.SSLError):
            await _exchange(stranger.contexts()[0], cli)
        # revocation: a RotatingContext picks up the new CRL for the next connection
        rot = pki.rotating(True, srv)
        assert await _exchange(rot, _client(doomed, server.trust)) == "n3"
        server.write_trust([ca[0]], [pki.make_crl(ca[0], ca[1], [doomed.cert.serial_number], 2)])
        rot.current = server.contexts()[0]
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await _exchange(rot, _client(doomed, server.trust))
        assert await _exchange(rot, _client(member, server.trust)) == "n2"
        # and a member's client refuses a revoked server
        revoked_server = doomed.contexts()[0]
        with pytest.raises(ssl.SSLError):
            await _exchange(revoked_server, server.contexts()[1])

    asyncio.run(run())


def test_rotation_trusts_both_cas_then_only_the_new(tmp_path: Path) -> None:
    old, new = pki.new_ca(), pki.new_ca()
    crls = [pki.make_crl(old[0], old[1], [], 1), pki.make_crl(new[0], new[1], [], 1)]
    server = Member(tmp_path, "n1", new, crls=crls, trust=[old[0], new[0]])
    on_old = Member(tmp_path, "n2", old, crls=crls, trust=[old[0], new[0]])
    srv = pki.rotating(True, server.contexts()[0])

    async def run() -> None:
        assert await _exchange(srv, _client(on_old, on_old.trust)) == "n2"  # during: both CAs trusted
        server.write_trust([new[0]], crls[1:])
        srv.current = server.contexts()[0]
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await _exchange(srv, _client(on_old, on_old.trust))  # after: the old CA's certificate is refused

    asyncio.run(run())


# ---- the signer's decisions -----------------------------------------------------------------------------------


@pytest.fixture
def signer(tmp_path: Path) -> ClusterPki:
    p = ClusterPki(node="n1", data_root=str(tmp_path), lifetime=3600.0)
    ca, key = pki.new_ca()
    fp = p.files.save_ca(ca, key)
    p.bundle = Bundle(1, [ca], fp, "n1").sign({fp: key})
    p.crls = {fp: pki.make_crl(ca, key, [], 1)}
    p._write_join_token(pki.new_secret())
    return p


def _join(p: ClusterPki, node: str, secret: str | None = None, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    key = pki.new_key()
    csr = pki.make_csr(key, name or node, ["10.1.2.3"])
    proof = {"kind": "join", "hmac": pki.join_proof(secret if secret is not None else p._join_secret(), node,
                                                    pki.csr_der(csr))}
    return key, {"csr": pki.csr_pem(csr), "proof": proof}


def test_signer_admits_the_token_and_signs_what_the_request_names(signer: ClusterPki) -> None:
    key, req = _join(signer, "n2")
    ans = signer.decide("n2", req)
    cert = pki.load_cert(ans["cert"])
    assert pki.common_name(cert) == "n2" and cert.public_key() == key.public_key()
    assert pki.issued_by(cert, signer.bundle.cas[0]) and ans["ca"] == signer.bundle.current
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.1.2.3" in {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    life = cert.not_valid_after_utc - cert.not_valid_before_utc - pki.BACKDATE
    assert abs(life.total_seconds() - 3600) < 5
    assert signer.join_token().startswith("SM1" + signer.bundle.current + "::")


@pytest.mark.parametrize("case", ["wrong-secret", "other-name", "etcd-not-allowed", "unknown-kind", "bad-node-id"])
def test_signer_refuses(signer: ClusterPki, case: str) -> None:
    if case == "wrong-secret":
        _, req = _join(signer, "n2", secret=pki.new_secret())
    elif case == "other-name":
        _, req = _join(signer, "n2", name="n9")
    elif case == "etcd-not-allowed":
        _, req = _join(signer, "n2")
        req["proof"] = {"kind": "etcd"}
    elif case == "unknown-kind":
        _, req = _join(signer, "n2")
        req["proof"] = {"kind": "please"}
    else:
        _, req = _join(signer, "n2")
        with pytest.raises(PkiError):
            signer.decide("../n2", req)
        return
    with pytest.raises(PkiError):
        signer.decide("n2", req)


def test_signer_renews_members_and_not_the_forgotten(signer: ClusterPki) -> None:
    key, req = _join(signer, "n2")
    cert = pki.load_cert(signer.decide("n2", req)["cert"])
    new_key = pki.new_key()
    csr = pki.make_csr(new_key, "n2")
    der = pki.csr_der(csr)
    renew = {"csr": pki.csr_pem(csr), "proof": {"kind": "renew", "cert": pki.cert_pem(cert),
                                                "sig": pki.renew_proof(key, "n2", der)}}
    renewed = pki.load_cert(signer.decide("n2", renew)["cert"])
    assert renewed.public_key() == new_key.public_key() and renewed.serial_number != cert.serial_number
    # a proof signed by another key is not one
    bad = {**renew, "proof": {**renew["proof"], "sig": pki.renew_proof(pki.new_key(), "n2", der)}}
    with pytest.raises(PkiError, match="does not verify"):
        signer.decide("n2", bad)
    # forgotten: neither renewal nor a join with the current token; after a token rotation it may join again
    signer.files.write_json(signer.files.forgotten, ["n2"])
    with pytest.raises(PkiError, match="forgotten"):
        signer.decide("n2", renew)
    with pytest.raises(PkiError, match="forgotten"):
        signer.decide("n2", _join(signer, "n2")[1])
    asyncio.run(signer.rotate_token())
    assert signer.decide("n2", _join(signer, "n2")[1])["cert"]


def test_renewal_is_due_at_half_the_lifetime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = ClusterPki(node="n2", data_root=str(tmp_path), lifetime=100.0)
    ca, key = pki.new_ca()
    p.bundle = Bundle(1, [ca], pki.fingerprint(ca), "n1")
    p.cert = pki.sign_request(ca, key, pki.make_csr(pki.new_key(), "n2"), "n2", [], datetime.timedelta(seconds=100))
    start = pki.now()
    assert not p.renewal_due()
    monkeypatch.setattr(pki, "now", lambda: start + datetime.timedelta(seconds=40))
    assert not p.renewal_due()  # 60 s of 100 left (the 5-minute back-dating does not count)
    monkeypatch.setattr(pki, "now", lambda: start + datetime.timedelta(seconds=55))
    assert p.renewal_due()  # less than half left
    monkeypatch.setattr(pki, "now", lambda: start)
    p.lifetime = datetime.timedelta(seconds=1000)  # the signer's shorter lifetime counts, not ours
    monkeypatch.setattr(pki, "now", lambda: start + datetime.timedelta(seconds=55))
    assert p.renewal_due()
    monkeypatch.setattr(pki, "now", lambda: start)
    other, _ = pki.new_ca()
    p.bundle = Bundle(2, [ca, other], pki.fingerprint(other), "n1")
    p.cert = pki.sign_request(ca, key, pki.make_csr(pki.new_key(), "n2"), "n2", [], datetime.timedelta(seconds=100))
    assert p.renewal_due()  # the signing CA changed (rotation)


def test_etcd_reached_in_clear_is_named() -> None:
    from syncmesh_plugin.daemon import plain_etcd

    assert plain_etcd(["http://127.0.0.1:2379", "localhost:2379", "https://10.0.0.5:2379", "http://[::1]:2379"]) == []
    assert plain_etcd(["http://10.0.0.5:2379", "etcd.lan:2379"]) == ["http://10.0.0.5:2379", "etcd.lan:2379"]


def test_local_state_is_reused_only_by_the_node_it_names(signer: ClusterPki, tmp_path: Path) -> None:
    signer._save_trust()
    signer._sign_own()
    again = ClusterPki(node="n1", data_root=str(tmp_path), lifetime=3600.0)
    assert again.load_local() and again.cert is not None and again.is_signer
    assert pki.serial_hex(again.cert.serial_number) == pki.serial_hex(signer.cert.serial_number)  # type: ignore[union-attr]
    renamed = ClusterPki(node="n9", data_root=str(tmp_path), lifetime=3600.0)
    assert not renamed.load_local() and renamed.cert is None  # joins again with its token instead
