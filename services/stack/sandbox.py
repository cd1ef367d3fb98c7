"""A private native stack in a temporary directory on free ports, for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

from services.common.discovery.registry import ServiceAddress, write_registry
from services.common.identity.workloads import SERVICES
from services.stack.native import NativeStack, StackSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> list[int]:
    """Free ports on 127.0.0.1, all held until every one is picked, so that none repeats."""
    with ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port() -> int:
    return free_ports(1)[0]


def sandbox_settings(
    root: Path,
    svid_ttl: str | None = None,
    risk_rules: Path | None = None,
    trust_levels: Path | None = None,
    upstream: Literal["disk", "vault"] | None = None,
) -> StackSettings:
    """Settings of a private stack under ``root``: its own home and certs, its own copies of
    the repository's policy and trust levels (unless given; the labs and tests edit them live,
    and stacks side by side must not see each other's edits), the repository's risk rules
    (unless given), a registry (written here) that puts every service on free ports, and free
    ports for the issuer's revocation endpoint and for Vault (``upstream="vault"``)."""
    ports = iter(free_ports(2 * len(SERVICES) + 3))
    root.mkdir(parents=True, exist_ok=True)
    policy = root / "policy.json"
    shutil.copyfile(REPO_ROOT / "infra" / "policy.json", policy)
    if trust_levels is None:
        trust_levels = root / "trust-levels.json"
        shutil.copyfile(REPO_ROOT / "infra" / "trust-levels.json", trust_levels)
    registry = root / "registry.json"
    write_registry(
        registry,
        [ServiceAddress(w.name, "127.0.0.1", next(ports), next(ports)) for w in SERVICES],
    )
    return StackSettings(
        home=root / "var",
        certs_dir=root / "certs",
        registry=registry,
        policy=policy,
        risk_rules=risk_rules or REPO_ROOT / "infra" / "risk" / "rules.json",
        trust_levels=trust_levels,
        svid_ttl=svid_ttl,
        issuer_http=f"127.0.0.1:{next(ports)}",
        upstream=upstream,
        vault_port=next(ports),
        vault_cluster_port=next(ports),
    )


@contextmanager
def sandbox_stack(
    svid_ttl: str | None = None,
    risk_rules: Path | None = None,
    trust_levels: Path | None = None,
    upstream: Literal["disk", "vault"] | None = None,
) -> Iterator[NativeStack]:
    """Up on entry, always down and deleted on exit.  The directory is short (unix sockets)."""
    root = Path(tempfile.mkdtemp(prefix="zts", dir="/tmp"))
    try:
        stack = NativeStack(sandbox_settings(root, svid_ttl, risk_rules, trust_levels, upstream))
        try:
            stack.up()
            yield stack
        finally:
            stack.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)
