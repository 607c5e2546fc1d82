"""The etcd keyspace: every key is built and parsed here, and only meta.py uses this module.

Keys under the prefix (default /syncmesh/v1):
  nodes/<node>                  node record, under the node's lease
  volumes/<name>                volume record (options, created_by, created_at); Create = put-if-absent
  files/<volume>/<path>         one manifest per path (file, dir, symlink, tombstone)
  head/<volume>                 rewritten by every publish: its mod_revision is the volume's latest change
  gc/<volume>                   revision up to which tombstones were collected
  mounts/<volume>/<node>        "volume mounted on node", under the node's lease
  holders/<volume>/<node>       "node holds a replica", under the node's lease
  applied/<volume>/<node>       how far the node has applied the volume, under the node's lease
  election/<name>/<node>        housekeeping election: the oldest registration leads
  pki/ca                        the trust bundle: accepted CA certificates, the signing one, signatures
  pki/crl                       one revocation list per CA, each signed by its CA
  pki/csr/<node>                a node's certificate request (join proof or renewal proof)
  pki/certs/<node>              the signer's answer: the certificate, or why it was refused
  pki/nodes/<node>              a node's PKI state: trusted bundle seq, certificate CA and expiry
  ping, rev                     read to check etcd answers and to learn the current revision

Names (node, volume) are validated elsewhere and never hold a "/"; paths do, so a file key is parsed
by stripping its volume's prefix, never by splitting.
"""

from __future__ import annotations

# The per-volume parts that a volume's removal deletes (with volumes/<name> and head/<name>).
VOLUME_PARTS = ("files", "mounts", "holders", "applied", "replicas")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class Keyspace:
    """Builds the keys of one cluster (one prefix) and parses them back."""

    def __init__(self, prefix: str) -> None:
        self.root = prefix.encode()

    def join(self, *parts: str) -> bytes:
        """prefix/part/part...; the typed builders below are what callers use."""
        return self.root + b"/" + "/".join(parts).encode("utf-8", "surrogateescape")

    def _dir(self, *parts: str) -> bytes:
        return self.join(*parts) + b"/"

    # ---- single keys
    def ping_key(self) -> bytes:
        return self.join("ping")

    def rev_key(self) -> bytes:
        return self.join("rev")

    def node_key(self, node: str) -> bytes:
        return self.join("nodes", node)

    def volume_key(self, name: str) -> bytes:
        return self.join("volumes", name)

    def file_key(self, volume: str, path: str) -> bytes:
        return self.join("files", volume, path)

    def head_key(self, volume: str) -> bytes:
        """Rewritten in every transaction that publishes to the volume, so its mod_revision is the
        volume's latest change, read in one get (a sorted range over a million keys takes seconds)."""
        return self.join("head", volume)

    def gc_key(self, volume: str) -> bytes:
        return self.join("gc", volume)

    def mount_key(self, volume: str, node: str) -> bytes:
        return self.join("mounts", volume, node)

    def holder_key(self, volume: str, node: str) -> bytes:
        return self.join("holders", volume, node)

    def replica_key(self, volume: str, node: str) -> bytes:
        """A node's durable replica record: not under a lease, so an offline replica stays visible."""
        return self.join("replicas", volume, node)

    def applied_key(self, volume: str, node: str) -> bytes:
        return self.join("applied", volume, node)

    def election_key(self, election: str, node: str) -> bytes:
        return self.join("election", election, node)

    # ---- prefixes (with their trailing "/")
    def nodes_prefix(self) -> bytes:
        return self._dir("nodes")

    def volumes_prefix(self) -> bytes:
        return self._dir("volumes")

    def files_prefix(self, volume: str) -> bytes:
        return self._dir("files", volume)

    def mounts_prefix(self, volume: str) -> bytes:
        return self._dir("mounts", volume)

    def holders_prefix(self, volume: str | None = None) -> bytes:
        """One volume's holders, or every volume's (holders/<volume>/<node>) without a volume."""
        return self._dir("holders", volume) if volume is not None else self._dir("holders")

    def applied_prefix(self, volume: str | None = None) -> bytes:
        """One volume's applied records, or every volume's without a volume."""
        return self._dir("applied", volume) if volume is not None else self._dir("applied")

    def replicas_prefix(self, volume: str | None = None) -> bytes:
        """One volume's replica records, or every volume's without a volume."""
        return self._dir("replicas", volume) if volume is not None else self._dir("replicas")

    def election_prefix(self, election: str) -> bytes:
        return self._dir("election", election)

    def volume_prefixes(self, name: str) -> list[bytes]:
        """Every per-volume prefix a volume's removal deletes."""
        return [self._dir(part, name) for part in VOLUME_PARTS]

    # ---- the cluster's PKI (autotls.py through meta.py)
    def pki_key(self, name: str) -> bytes:
        """pki/ca (trust bundle) or pki/crl (revocation lists)."""
        return self.join("pki", name)

    def csr_key(self, node: str) -> bytes:
        return self.join("pki", "csr", node)

    def csr_prefix(self) -> bytes:
        return self._dir("pki", "csr")

    def cert_key(self, node: str) -> bytes:
        return self.join("pki", "certs", node)

    def pki_node_key(self, node: str) -> bytes:
        return self.join("pki", "nodes", node)

    def pki_nodes_prefix(self) -> bytes:
        return self._dir("pki", "nodes")

    # ---- parsing
    def path_of(self, volume: str, key: bytes) -> str:
        """The path of a files/<volume>/<path> key (undecodable bytes kept as surrogates)."""
        return key[len(self.files_prefix(volume)):].decode("utf-8", "surrogateescape")

    @staticmethod
    def name_under(prefix: bytes, key: bytes) -> str:
        """What follows `prefix` in `key`: the node of holders/<volume>/<node>, the name of volumes/<name>..."""
        return _text(key[len(prefix):])

    @staticmethod
    def pair_under(prefix: bytes, key: bytes) -> tuple[str, str] | None:
        """(volume, node) of a <part>/<volume>/<node> key read under <part>/; None for any other shape."""
        parts = _text(key[len(prefix):]).split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else None
