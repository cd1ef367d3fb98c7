"""Workload attestation from kernel-provided peer credentials (SO_PEERCRED).

The kernel fills in the pid, uid and gid of the process that connected the unix socket; nothing
the workload sends is trusted.  Extra facts (supplementary groups, executable path) come from
``/proc/<pid>`` when it is visible to the issuer, and only while a pidfd of the connecting
process shows that ``<pid>`` is still that process.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from services.issuer.domain.entries import Selector

_UCRED = struct.Struct("3i")
# Not in Python 3.11's socket module; the value is Linux's (include/uapi/asm-generic/socket.h).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return PeerCredentials(pid, uid, gid)


def peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd for the process that connected ``sock``; the caller closes it.

    SO_PEERPIDFD (Linux 6.5+) names exactly the process that connected, however its pid is
    reused later.  Older kernels get ``pidfd_open(pid)``, which a pid reused between the
    connection and this call could fool.  None when the process is gone.
    """
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _exited(pidfd: int) -> bool:
    """A pidfd turns readable when its process exits (no permission to signal it needed)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def _process_facts(pid: int) -> set[Selector]:
    """Supplementary groups and executable from /proc (hidden for another uid's executable)."""
    facts: set[Selector] = set()
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("Groups:"):
                facts.update(Selector("unix", "gid", g) for g in line.split()[1:])
    with contextlib.suppress(OSError):
        facts.add(Selector("unix", "path", os.readlink(f"/proc/{pid}/exe")))
    return facts


def workload_selectors(
    creds: PeerCredentials, socket_name: str | None, pidfd: int | None
) -> frozenset[Selector]:
    """What the kernel says of the peer, plus what /proc says of it while it provably is the
    same process: the facts are read, then kept only if ``pidfd``'s process is still running,
    so a pid reused by another process in between cannot lend its groups or executable."""
    selectors = {Selector("unix", "uid", str(creds.uid)), Selector("unix", "gid", str(creds.gid))}
    if pidfd is not None:
        facts = _process_facts(creds.pid)
        if not _exited(pidfd):
            selectors.update(facts)
    if socket_name is not None:
        selectors.add(Selector("ztbank", "socket", socket_name))
    return frozenset(selectors)
