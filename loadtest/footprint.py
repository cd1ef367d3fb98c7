"""The native stack's footprint with each upstream: how long ``up`` takes (first start, and
again after ``down``) and the resident memory of each process once it has settled.

    python -m loadtest.footprint [--repeat 3]

Each run is a private stack on free ports (``services.stack.sandbox``), always torn down.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from services.stack.native import NativeStack
from services.stack.sandbox import sandbox_settings

SETTLE_SECONDS = 5.0
UP_TIMEOUT = 90.0


def resident_mib(stack: NativeStack) -> dict[str, int]:
    processes = {"issuer": stack.issuer, **stack.services, "vault": stack.vault.process}
    sizes = {}
    for name, process in processes.items():
        if (pid := process.pid()) is None:
            continue
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes[name] = int(line.split()[1]) // 1024
    return sizes


def measure(upstream: str) -> str:
    root = Path(tempfile.mkdtemp(prefix="ztf", dir="/tmp"))  # short: unix socket paths
    stack = NativeStack(sandbox_settings(root, upstream="vault" if upstream == "vault" else None))
    try:
        started = time.monotonic()
        stack.up(timeout=UP_TIMEOUT)
        first = time.monotonic() - started
        time.sleep(SETTLE_SECONDS)
        sizes = resident_mib(stack)
        stack.down()
        started = time.monotonic()
        stack.up(timeout=UP_TIMEOUT)
        again = time.monotonic() - started
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
    parts = ", ".join(f"{name} {mib}" for name, mib in sizes.items())
    return (
        f"{upstream:<5} up {first:.1f} s (first), {again:.1f} s (after down);"
        f" RSS {sum(sizes.values())} MiB ({parts})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each upstream")
    args = parser.parse_args()
    for _ in range(args.repeat):
        for upstream in ("disk", "vault"):
            print(measure(upstream), flush=True)


if __name__ == "__main__":
    main()
