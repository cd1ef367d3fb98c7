"""An SVID fetched by a child process running as another uid: real ``unix:uid`` attestation.

The compose stack tells its workloads apart by uid on one shared Workload API socket, so what
runs as root beside it (the labs, the console, the e2e harness) gets a workload's SVID the way
that workload does: from a child process that drops to the workload's uid and gid before it
connects, and prints the SVID as JSON on a pipe.
``python -m services.common.identity.as_uid UID GID SOCKET TRUST_DOMAIN TIMEOUT`` is the child.
It starts as root and switches itself (not ``subprocess``'s ``user=``, which switches before
exec) because the interpreter may live where only root may read, as under /root here.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import grpc
import spiffe

from services.common.errors import CommonError
from services.common.identity.source import (
    SvidMaterial,
    SvidUnavailableError,
    fetch_svid,
    svid_from_pem,
)

# Where ``services`` is importable from, for the child.
PACKAGE_PARENT = Path(__file__).resolve().parents[3]
CHILD_MODULE = "services.common.identity.as_uid"
CHILD_TIMEOUT = 20.0


def fetch_svid_as(
    uid: int, gid: int, socket_uri: str, trust_domain: str, *, timeout: float = 5.0
) -> SvidMaterial:
    """The SVID the issuer hands a process of ``uid``:``gid`` (needs root to switch uid)."""
    try:
        child = _run_child(uid, gid, socket_uri, trust_domain, timeout)
    except subprocess.TimeoutExpired:
        raise SvidUnavailableError(
            f"uid {uid}: no SVID within {CHILD_TIMEOUT:g} s from {socket_uri}"
        ) from None
    if child.returncode != 0:
        raise SvidUnavailableError(f"uid {uid}: {child.stderr.strip() or child.returncode}")
    reply = json.loads(child.stdout)
    return svid_from_pem(
        reply["chain_pem"].encode(),
        reply["key_pem"].encode(),
        reply["bundle_pem"].encode(),
        trust_domain,
    )


def _run_child(
    uid: int, gid: int, socket_uri: str, trust_domain: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            CHILD_MODULE,
            str(uid),
            str(gid),
            socket_uri,
            trust_domain,
            str(timeout),
        ],
        cwd=PACKAGE_PARENT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def _import_everything_the_fetch_may_need() -> None:
    """grpc and py-spiffe import modules on first use; import them all while still root,
    because after the switch the interpreter's files may be out of reach (a 0700 temp clone of
    the repository in CI)."""
    for package in (grpc, spiffe):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            with contextlib.suppress(ImportError):
                importlib.import_module(module.name)


def main(argv: list[str]) -> int:
    uid, gid, socket_uri, trust_domain, timeout = argv
    _import_everything_the_fetch_may_need()
    try:
        os.setgroups([])
        os.setgid(int(gid))
        os.setuid(int(uid))
    except PermissionError:
        print(f"switching to uid {uid} needs root", file=sys.stderr)
        return 1
    try:
        material = fetch_svid(socket_uri, trust_domain, timeout=float(timeout))
    except CommonError as error:
        print(error, file=sys.stderr)
        return 1
    reply = {
        "spiffe_id": str(material.spiffe_id),
        "chain_pem": material.chain_pem.decode(),
        "key_pem": material.key_pem.decode(),
        "bundle_pem": material.bundle_pem.decode(),
    }
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
