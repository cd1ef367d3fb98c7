"""The error root of the gateway; ``transport.problems`` turns these into problem+json."""


class GatewayError(Exception):
    """Root of every error raised by ``services.gateway``."""


class TokenKeyError(GatewayError):
    """The token signing key on disk is unreadable, not P-256, or readable by others."""


class AuthenticationError(GatewayError):
    """The request carries no usable customer token."""


class MissingTokenError(AuthenticationError):
    """No ``Authorization: Bearer`` credentials at all."""


class InvalidTokenError(AuthenticationError):
    """A bearer token that is malformed, forged, expired or meant for someone else."""


class PermissionDeniedError(GatewayError):
    """The caller is known but may not do this (not the teller, not the account's owner)."""


class UnknownCustomerError(GatewayError):
    """A token was asked for a customer the bank does not know."""


class BadRequestError(GatewayError):
    """The request is missing something the protocol requires (an ``Idempotency-Key``)."""


class InvalidRequestError(GatewayError):
    """The request is well-formed but cannot be carried out as asked (bad amount, currency)."""


class NotFoundError(GatewayError):
    """The engine knows no such account or transfer for this customer."""


class ConflictError(GatewayError):
    """The request conflicts with an earlier one (idempotency key reused for another body)."""


class EngineUnavailableError(GatewayError):
    """The transfer-engine did not answer in time; retrying later may succeed, after
    ``retry_after_seconds`` when the gateway knows (its circuit breaker's cool-down)."""

    def __init__(self, message: str, *, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EngineError(GatewayError):
    """The transfer-engine failed, or answered something the gateway cannot trust."""
