"""A private native stack in a temporary directory on free ports, for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.registry import ServiceAddress, write_registry
from services.common.workloads import SERVICES
from services.stack.native import NativeStack, StackSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def sandbox_stack(
    svid_ttl: str | None = None, risk_rules: Path | None = None
) -> Iterator[NativeStack]:
    """Up on entry, always down and deleted on exit.  The directory is short (unix sockets)."""
    root = Path(tempfile.mkdtemp(prefix="zts", dir="/tmp"))
    try:
        registry = root / "registry.json"
        write_registry(
            registry,
            [ServiceAddress(w.name, "127.0.0.1", free_port(), free_port()) for w in SERVICES],
        )
        stack = NativeStack(
            StackSettings(
                home=root / "var",
                certs_dir=root / "certs",
                registry=registry,
                policy=REPO_ROOT / "infra" / "policy.json",
                risk_rules=risk_rules or REPO_ROOT / "infra" / "risk" / "rules.json",
                svid_ttl=svid_ttl,
            )
        )
        try:
            stack.up()
            yield stack
        finally:
            stack.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)
