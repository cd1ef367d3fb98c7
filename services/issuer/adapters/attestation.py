"""Workload attestation from kernel-provided peer credentials (SO_PEERCRED).

The kernel fills in the pid, uid and gid of the process that connected the unix socket; nothing
the workload sends is trusted.  Extra facts (supplementary groups, executable path) come from
``/proc/<pid>`` when it is visible to the issuer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from services.issuer.domain.entries import Selector

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return PeerCredentials(pid, uid, gid)


def _supplementary_groups(pid: int) -> set[int]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    for line in status.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()


def workload_selectors(creds: PeerCredentials, socket_name: str | None) -> frozenset[Selector]:
    selectors = {Selector("unix", "uid", str(creds.uid)), Selector("unix", "gid", str(creds.gid))}
    selectors.update(Selector("unix", "gid", str(g)) for g in _supplementary_groups(creds.pid))
    # For another uid's process /proc hides the executable, so no path selector is offered.
    with contextlib.suppress(OSError):
        selectors.add(Selector("unix", "path", os.readlink(f"/proc/{creds.pid}/exe")))
    if socket_name is not None:
        selectors.add(Selector("ztbank", "socket", socket_name))
    return frozenset(selectors)
