"""Settings every ztbank process shares (``ZTBANK_HOME``, ``ZTBANK_CERTS_DIR``,
``ZTBANK_TRUST_DOMAIN``) and one-line reporting of invalid settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.errors import CommonError
from services.common.identity.spiffe_id import DEFAULT_TRUST_DOMAIN, validate_trust_domain

# A unix socket path longer than this does not fit sockaddr_un on Linux.
MAX_SOCKET_PATH = 107


class InvalidSettingsError(CommonError):
    """A setting from the environment (or a flag mirroring it) is invalid."""


def socket_path_from_endpoint(endpoint: str) -> Path:
    """``unix:///abs/path`` (the SPIFFE_ENDPOINT_SOCKET form) or a bare absolute path -> Path."""
    path = endpoint.removeprefix("unix://")
    if not path.startswith("/"):
        raise ValueError(f"socket {endpoint!r} must be an absolute unix path (unix:///path)")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes")
    return Path(path)


class ZtbankSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZTBANK_", extra="ignore", populate_by_name=True)

    home: Path = Path("var")
    certs_dir: Path = Path("certs")
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # host:port the issuer's plain-HTTP revocation endpoints (CRLs, OCSP) listen on; they serve
    # signed data only.
    issuer_http: str = "127.0.0.1:8180"
    # Where peers reach those endpoints: written into every certificate (CRL distribution point,
    # OCSP responder) and polled by the services.  Empty: http://<issuer_http>.
    issuer_public_url: str = ""
    # The issuer's admin socket (0600, the issuer's uid). Unset: under ZTBANK_HOME, where the
    # issuer of this home makes it; beside the compose stack: in the issuer's volume.
    issuer_admin_socket: Path | None = None

    @field_validator("trust_domain")
    @classmethod
    def _valid_trust_domain(cls, value: str) -> str:
        return validate_trust_domain(value)

    @field_validator("home", "certs_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.absolute()

    @field_validator("issuer_public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(f"{value!r} must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @property
    def issuer_url(self) -> str:
        return self.issuer_public_url or f"http://{self.issuer_http}"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def admin_socket(self) -> Path:
        return self.issuer_admin_socket or self.run_dir / "issuer" / "admin.sock"

    @property
    def default_workload_endpoint(self) -> str:
        return f"unix://{self.run_dir / 'workload.sock'}"

    def workload_socket_for(self, name: str) -> Path:
        """Per-workload socket of the native single-user stack (see README: trust model)."""
        return self.run_dir / name / "agent.sock"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build ``cls`` from the environment; a validation failure becomes one readable line."""
    try:
        return cls(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        name = field if field.isupper() else f"ZTBANK_{field.upper()}"
        where = f" {name}" if field else ""
        raise InvalidSettingsError(f"invalid setting{where}: {message}") from None
