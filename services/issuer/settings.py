"""Typed, env-driven settings of the issuer (``ZTBANK_*`` plus the standard SPIFFE/Vault names)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator

from services.common.durations import format_duration, parse_duration
from services.common.settings import ZtbankSettings, socket_path_from_endpoint

MAX_SVID_TTL = timedelta(minutes=10)
MIN_SVID_TTL = timedelta(seconds=5)
MIN_CRL_TTL = timedelta(seconds=5)


def parse_listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ValueError saying what is wrong."""
    try:
        parts = urlsplit(f"//{value}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port or parts.path or parts.query or parts.username is not None:
        raise ValueError(f"{value!r} must be HOST:PORT with a port from 1 to 65535")
    return host, port


class IssuerSettings(ZtbankSettings):
    """Everything the issuer reads from its environment."""

    svid_ttl: timedelta = timedelta(minutes=5)
    jwt_svid_ttl: timedelta = timedelta(minutes=5)
    ca_ttl: timedelta = timedelta(hours=24)
    # Validity (thisUpdate..nextUpdate) of CRLs and OCSP answers; unset means ZTBANK_SVID_TTL.
    crl_ttl: timedelta | None = None
    upstream: Literal["disk", "vault"] = "disk"
    endpoint_socket: str = Field(
        default="",
        validation_alias=AliasChoices("SPIFFE_ENDPOINT_SOCKET", "ZTBANK_ENDPOINT_SOCKET"),
    )
    vault_addr: str = Field(default="", validation_alias=AliasChoices("VAULT_ADDR"))
    vault_cacert: str | None = Field(default=None, validation_alias=AliasChoices("VAULT_CACERT"))
    # Secrets are left out of repr, so that logging the settings never leaks them.
    vault_token: str | None = Field(
        default=None, validation_alias=AliasChoices("VAULT_TOKEN"), repr=False
    )
    vault_pki_mount: str = "pki_int"
    vault_root_mount: str = "pki"
    vault_approle_mount: str = "approle"
    vault_role_id: str | None = None
    vault_secret_id: str | None = Field(default=None, repr=False)
    # JSON {"role_id": ..., "secret_id": ...} as infra/vault/bootstrap.py writes it, read at every
    # login; an alternative to ZTBANK_VAULT_ROLE_ID and ZTBANK_VAULT_SECRET_ID.
    vault_approle_file: Path | None = None
    # PEM file of the root CA of Vault's root mount: the only root the issuer trusts, re-read at
    # every signing (whatever Vault returns must chain to it).
    vault_root_ca: Path | None = None

    @field_validator("svid_ttl", "jwt_svid_ttl", "ca_ttl", "crl_ttl", mode="before")
    @classmethod
    def _parse_durations(cls, value: object) -> object:
        if value == "":
            return None
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("vault_approle_file", "vault_root_ca", mode="before")
    @classmethod
    def _unset_path(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("vault_approle_file", "vault_root_ca")
    @classmethod
    def _absolute_path(cls, value: Path | None) -> Path | None:
        return None if value is None else value.absolute()

    @model_validator(mode="after")
    def _consistent(self) -> IssuerSettings:
        for name in ("svid_ttl", "jwt_svid_ttl"):
            value: timedelta = getattr(self, name)
            if not MIN_SVID_TTL <= value <= MAX_SVID_TTL:
                raise ValueError(
                    f"ZTBANK_{name.upper()} must be between 5s and 10m"
                    f" (got {format_duration(value)})"
                )
        if self.ca_ttl < 6 * self.svid_ttl:
            raise ValueError("ZTBANK_CA_TTL must be at least six times ZTBANK_SVID_TTL")
        if self.crl_ttl is None:
            self.crl_ttl = self.svid_ttl
        # At least 5s so that re-signing at half of it stays cheap; at most the SVID TTL so that a
        # relying party never trusts a CRL older than the certificates it vouches for.
        if not MIN_CRL_TTL <= self.crl_ttl <= self.svid_ttl:
            raise ValueError(
                "ZTBANK_CRL_TTL must be between 5s and ZTBANK_SVID_TTL"
                f" ({format_duration(self.svid_ttl)}; got {format_duration(self.crl_ttl)})"
            )
        try:
            host, _ = parse_listen_address(self.issuer_http)
        except ValueError as error:
            raise ValueError(f"ZTBANK_ISSUER_HTTP: {error}") from None
        if host in ("0.0.0.0", "::") and not self.issuer_public_url:  # noqa: S104 (refused here)
            raise ValueError(
                f"ZTBANK_ISSUER_HTTP listens on every address ({self.issuer_http}), which no peer"
                " can be sent to: set ZTBANK_ISSUER_PUBLIC_URL to the URL they reach it by"
            )
        if not self.endpoint_socket:
            self.endpoint_socket = self.default_workload_endpoint
        try:
            socket_path_from_endpoint(self.endpoint_socket)
        except ValueError as error:
            raise ValueError(f"SPIFFE_ENDPOINT_SOCKET: {error}") from None
        if self.upstream == "vault":
            if not self.vault_addr:
                raise ValueError("ZTBANK_UPSTREAM=vault needs VAULT_ADDR")
            self._check_vault_auth()
            if self.vault_root_ca is None:
                raise ValueError(
                    "ZTBANK_UPSTREAM=vault needs ZTBANK_VAULT_ROOT_CA: the PEM file of the root CA"
                    f" of Vault's {self.vault_root_mount} mount, the only root the issuer trusts"
                )
        return self

    def _check_vault_auth(self) -> None:
        inline = bool(self.vault_role_id or self.vault_secret_id)
        if self.vault_approle_file is not None and inline:
            raise ValueError(
                "ZTBANK_VAULT_APPROLE_FILE and ZTBANK_VAULT_ROLE_ID/ZTBANK_VAULT_SECRET_ID are"
                " alternatives: set only one"
            )
        if self.vault_role_id and not self.vault_secret_id:
            raise ValueError("ZTBANK_VAULT_ROLE_ID needs ZTBANK_VAULT_SECRET_ID")
        if self.vault_secret_id and not self.vault_role_id:
            raise ValueError("ZTBANK_VAULT_SECRET_ID needs ZTBANK_VAULT_ROLE_ID")
        if not (self.vault_token or inline or self.vault_approle_file is not None):
            raise ValueError(
                "ZTBANK_UPSTREAM=vault needs ZTBANK_VAULT_APPROLE_FILE, or ZTBANK_VAULT_ROLE_ID"
                " and ZTBANK_VAULT_SECRET_ID, or VAULT_TOKEN"
            )

    @property
    def crl_validity(self) -> timedelta:
        """ZTBANK_CRL_TTL after validation (the SVID TTL when unset)."""
        return self.crl_ttl or self.svid_ttl

    @property
    def state_dir(self) -> Path:
        return self.home / "issuer"

    @property
    def workload_socket(self) -> Path:
        return socket_path_from_endpoint(self.endpoint_socket)
