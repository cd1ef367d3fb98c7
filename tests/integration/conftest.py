"""Fixtures that run the real issuer (``ztbank issuer run``) as a subprocess.

Every issuer gets its own short directory under /tmp (unix socket paths must stay under 108
bytes, which pytest's ``tmp_path`` does not guarantee), its own root CA made by
``ztbank certs init``, and a clean environment (``tests.support.helpers``): no ``ZTBANK_*``,
``SPIFFE_*``, ``VAULT_*`` or ``OTEL_*`` variable of the developer's shell leaks in.  Starting,
waiting for readiness and stopping are the library's (``services.issuer.harness``); readiness and
every other wait poll with a deadline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from services.issuer import harness
from tests.support.helpers import clean_environment

TRUST_DOMAIN = "ztbank.example"
DEFAULT_SVID_TTL = "10s"
CLI_TIMEOUT = 30.0


def ztbank_executable() -> str:
    """The ``ztbank`` console script of the interpreter running the tests."""
    beside = Path(sys.executable).with_name("ztbank")
    if beside.exists():
        return str(beside)
    found = shutil.which("ztbank")
    if found is None:
        raise RuntimeError("the ztbank console script is not installed (pip install -e .)")
    return found


class IssuerProcess(harness.IssuerProcess):
    """The library's issuer subprocess (``services.issuer.harness``) in ``base_dir``, and the
    CLI that talks to it.

    ``env`` is the complete environment of the issuer and of every ``cli`` call.
    """

    def __init__(self, base_dir: Path, env: dict[str, str]) -> None:
        super().__init__(env, base_dir / "issuer.log", inherit_environment=False)
        self.base_dir = base_dir

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``ztbank ARGS`` with the issuer's environment; never raises on a non-zero exit."""
        return subprocess.run(
            [ztbank_executable(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.cli(*args)
        assert result.returncode == 0, (
            f"ztbank {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nissuer log:\n{self.log()}"
        )
        return result

    def create_entry(self, spiffe_id: str, *selectors: str) -> str:
        """``ztbank entry create``; the new entry's id."""
        args = ["entry", "create", "--spiffe-id", spiffe_id, "--json"]
        for selector in selectors:
            args += ["--selector", selector]
        entry = json.loads(self.cli_ok(*args).stdout)
        assert entry["spiffe_id"] == spiffe_id
        return str(entry["id"])

    def entry_ids(self) -> list[str]:
        entries = json.loads(self.cli_ok("entry", "list", "--json").stdout)
        return [str(entry["id"]) for entry in entries]


class IssuerFactory:
    """Makes issuers in fresh short temp dirs; ``close`` stops them all and removes the dirs."""

    def __init__(self) -> None:
        self._issuers: list[IssuerProcess] = []
        self._dirs: list[Path] = []

    def prepare(self, **env: str) -> IssuerProcess:
        """An issuer with its root CA created but not started; ``env`` overrides variables."""
        base = Path(tempfile.mkdtemp(prefix="zt", dir="/tmp"))
        self._dirs.append(base)
        home = base / "home"
        full_env = clean_environment()
        full_env.update(
            {
                "ZTBANK_HOME": str(home),
                "ZTBANK_CERTS_DIR": str(base / "certs"),
                "ZTBANK_TRUST_DOMAIN": TRUST_DOMAIN,
                "ZTBANK_SVID_TTL": DEFAULT_SVID_TTL,
                "SPIFFE_ENDPOINT_SOCKET": f"unix://{home / 'run' / 'workload.sock'}",
            }
        )
        full_env.update(env)
        issuer = IssuerProcess(base, full_env)
        self._issuers.append(issuer)
        issuer.cli_ok("certs", "init")
        return issuer

    def __call__(self, **env: str) -> IssuerProcess:
        """A started issuer; ``env`` overrides variables, e.g. ``ZTBANK_SVID_TTL="5s"``."""
        issuer = self.prepare(**env)
        issuer.start()
        return issuer

    def close(self) -> None:
        for issuer in self._issuers:
            issuer.stop()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._issuers.clear()
        self._dirs.clear()

    def __enter__(self) -> IssuerFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture
def issuer_factory() -> Iterator[IssuerFactory]:
    with IssuerFactory() as factory:
        yield factory


@pytest.fixture
def issuer(issuer_factory: IssuerFactory) -> IssuerProcess:
    """A running issuer with ZTBANK_SVID_TTL=10s and no entries."""
    return issuer_factory(ZTBANK_SVID_TTL=DEFAULT_SVID_TTL)
