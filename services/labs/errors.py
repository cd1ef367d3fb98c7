"""The labs' error root: a lab that cannot go on raises one of these, and whoever runs it (the
CLI, a test) decides what that means for its caller, e.g. an exit code."""


class LabError(Exception):
    """The stack refused or failed what a lab (or the teller client it drives) asked of it."""


class FailedClosedError(LabError):
    """A request refused because identity or revocation data was missing or stale: the
    gateway refused the TLS connection (an alert, or a close right after a TLS 1.3 handshake),
    or this client could not check the gateway's certificate against fresh CRLs. What the
    outage lab waits for; a 500 or a gateway that does not listen is not."""


class LabUsageError(LabError):
    """What a lab was asked cannot be done as asked: an option out of range, a stack the lab
    does not run on, a request the gateway refused as the caller's mistake (4xx)."""
