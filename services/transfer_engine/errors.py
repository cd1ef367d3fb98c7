"""The error root of the transfer-engine; only the servicer translates these into gRPC statuses."""


class TransferEngineError(Exception):
    """Root of every error raised by ``services.transfer_engine``."""


class InvalidRequestError(TransferEngineError):
    """The request is malformed or impossible (bad amount, currency, key, date or accounts)."""


class NotFoundError(TransferEngineError):
    """The account or transfer does not exist, or is not visible to the customer."""


class NotOwnerError(TransferEngineError):
    """The customer asked to read or debit an account that belongs to someone else."""


class IdempotencyConflictError(TransferEngineError):
    """The idempotency key was already used by the same customer for a different request."""


class UnavailableError(TransferEngineError):
    """A dependency failed; nothing was stored, so the client may retry with the same key."""


class RiskUnavailableError(UnavailableError):
    """The risk service did not give a usable answer in time; transfers fail closed.
    ``retry_after_seconds`` is set when the engine knows a fair wait (its circuit breaker to
    risk is open)."""

    def __init__(self, message: str, *, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class LedgerBusyError(UnavailableError):
    """The ledger database stayed locked or unreachable for longer than the busy timeout."""


class LedgerStorageError(UnavailableError):
    """The ledger's storage failed (a full disk, an I/O error, a read-only file): nothing of
    the transfer was stored, and the same request may be retried once it is fixed."""
