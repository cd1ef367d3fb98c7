"""The error root of the risk service; the servicer translates these into gRPC statuses."""


class RiskError(Exception):
    """Root of every error raised by ``services.risk``."""


class RulesError(RiskError):
    """The rules file is missing, unreadable or invalid."""


class VelocityStoreError(RiskError):
    """The velocity history cannot be read or written: assessments fail closed."""


class InvalidTransferError(RiskError, ValueError):
    """A transfer to assess is malformed (no accounts, no currency, amount not positive)."""
