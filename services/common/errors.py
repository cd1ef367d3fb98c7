"""The error root of the shared library; every service translates these at its edge."""


class CommonError(Exception):
    """Root of every error raised by ``services.common``."""


class InvalidSpiffeIdError(CommonError, ValueError):
    """A string is not a SPIFFE ID under the strict syntax of the SPIFFE-ID spec."""


class InvalidDurationError(CommonError, ValueError):
    """A duration string such as ``20s`` or ``5m`` could not be parsed."""


class SvidVerificationError(CommonError):
    """A peer certificate chain is not a valid X509-SVID of the expected trust domain."""


class InvalidCertificateError(CommonError, ValueError):
    """Bytes that should hold X.509 certificates (PEM or DER) could not be parsed."""


class ChannelClosedError(CommonError):
    """A call was attempted on a client channel after its owner closed it (shutdown)."""
