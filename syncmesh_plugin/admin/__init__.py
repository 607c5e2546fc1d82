"""Admin commands of the CLI, one module per resource (node, cluster, volumes, files); they talk to a
node's HTTP API through client.py, never to etcd directly.

Exit codes (every admin command): 0 ok; 1 the node reports a problem (unhealthy, unknown volume,
differences found by verify, a node behind at the end of watch --until-converged); 2 bad
configuration or usage; 3 a node could not be reached.
"""

from __future__ import annotations

import click

from . import cluster, files, node, pki, versions, volumes
from .client import EXIT_CONFIG, EXIT_OK, EXIT_PROBLEM, EXIT_UNREACHABLE, Client

COMMANDS: list[click.Command] = [node.status, cluster.nodes, cluster.watch, cluster.forget, volumes.volumes,
                                 volumes.inspect, volumes.conflicts, volumes.resume, volumes.resync, volumes.hold,
                                 volumes.release, volumes.revert, volumes.override, files.files, files.verify,
                                 versions.versions, versions.restore, versions.versioning,
                                 versions.trash, versions.undelete, versions.purge, pki.ca, pki.token]

__all__ = ["COMMANDS", "EXIT_CONFIG", "EXIT_OK", "EXIT_PROBLEM", "EXIT_UNREACHABLE", "Client"]
