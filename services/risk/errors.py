"""The error root of the risk service; the servicer translates these into gRPC statuses."""


class RiskError(Exception):
    """Root of every error raised by ``services.risk``."""


class RulesError(RiskError):
    """The rules file is missing, unreadable or invalid."""


class VelocityStoreError(RiskError):
    """The velocity history cannot be read or written: assessments fail closed."""


class VelocityStorageError(VelocityStoreError):
    """The velocity history's storage failed (a full disk, an I/O error, a read-only or vanished
    file): nothing of the assessment was recorded, and the same transfer may be assessed again
    once it is fixed.  The message names the cause and is meant for the caller."""


class InvalidTransferError(RiskError, ValueError):
    """A transfer to assess is malformed (no accounts, no currency, amount not positive)."""
