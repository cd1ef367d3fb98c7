"""The error root of the issuer; transports translate these into gRPC statuses or CLI exits."""


class IssuerError(Exception):
    """Root of every error raised by ``services.issuer``."""


class SettingsError(IssuerError):
    """The issuer's configuration is invalid."""


class UpstreamError(IssuerError):
    """The upstream authority (disk root or Vault) could not sign the issuer's CA."""


class EntryError(IssuerError):
    """A registration entry is invalid, duplicated or unknown."""


class NotEntitledError(IssuerError):
    """The calling workload matches no registration entry."""


class MintError(IssuerError):
    """An admin mint request cannot be honoured (bad ID, TTL too long, outside the trust domain)."""


class RevokedIdentityError(NotEntitledError):
    """The SPIFFE ID is revoked: no SVID (workload or minted) is issued for it until lifted."""


class RevocationError(IssuerError):
    """A revocation request is malformed (bad serial, unknown reason, both or neither target)."""


class UnknownSerialError(RevocationError):
    """The serial was never issued by this issuer, or its certificate has already expired."""


class AlreadyRevokedError(RevocationError):
    """The certificate is already revoked."""


class NotRevokedError(RevocationError):
    """Lifting a revocation that does not exist."""
