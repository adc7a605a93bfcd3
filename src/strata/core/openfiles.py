"""A server process's open files limit, and the connection caps it can keep.

Each connection a listener holds is a file descriptor. A process at its open files limit can accept no connection,
and it can open nothing else either: its database, a package it downloads, its state file. So a server raises its
soft limit to the hard one at start, as Go's runtime does for every program (a shell's or systemd's default soft
limit of 1024 would stop it at about a thousand connections), and its listeners' caps stay `FD_RESERVE` descriptors
below that limit.
"""

from __future__ import annotations

import logging
import resource
from typing import Final

log = logging.getLogger(__name__)

FD_RESERVE: Final = 256  # descriptors kept for the process's own work: database, blobs, logs, its own clients
MIN_CONNECTIONS: Final = 16  # a tiny limit still leaves each listener a few connections


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    # with no hard limit, what the kernel may refuse (macOS takes at most OPEN_MAX, 10240): the largest it takes
    candidates = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 65536, 10240]
    for wanted in candidates:
        if wanted <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:  # a container may refuse it: the soft limit stays
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, wanted, exc)
            continue
        return int(wanted)
    return int(soft)


def effective_max_connections(wanted: int, open_files: int, listeners: int = 1) -> int:
    """The connection cap each of a process's `listeners` can keep: `wanted`, but all of them together never within
    `FD_RESERVE` descriptors of the open files limit (each at least MIN_CONNECTIONS)."""
    return min(wanted, max(MIN_CONNECTIONS, (open_files - FD_RESERVE) // max(1, listeners)))
