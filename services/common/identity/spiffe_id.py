"""SPIFFE IDs parsed under the strict syntax of the SPIFFE-ID specification.

Only lowercase letters, digits, ``-``, ``.`` and ``_`` in the trust domain; path segments of
letters, digits, ``-``, ``.`` and ``_``, never empty, never ``.`` or ``..``; no trailing slash,
query, fragment, port or user info.  Anything else is refused rather than normalised, so that two
different strings never name the same workload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidSpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
# fullmatch, not match with ``$``: ``$`` also matches before a trailing newline.
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
DEFAULT_TRUST_DOMAIN = "ztbank.example"


def validate_trust_domain(name: str) -> str:
    """Return ``name`` if it is a valid trust domain name, else raise InvalidSpiffeIdError."""
    if not name:
        raise InvalidSpiffeIdError("trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeIdError(f"trust domain longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN_CHARS.fullmatch(name):
        raise InvalidSpiffeIdError(
            f"trust domain {name!r} may contain only lowercase letters, digits, '.', '-' and '_'"
        )
    return name


def _validate_path(path: str) -> str:
    if path == "":
        return path
    if not path.startswith("/"):
        raise InvalidSpiffeIdError("path must start with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise InvalidSpiffeIdError("path has an empty segment or a trailing '/'")
        if segment in (".", ".."):
            raise InvalidSpiffeIdError("path segments '.' and '..' are not allowed")
        if not _SEGMENT_CHARS.fullmatch(segment):
            raise InvalidSpiffeIdError(
                f"path segment {segment!r} may contain only letters, digits, '.', '-' and '_'"
            )
    return path


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A parsed SPIFFE ID; ``str()`` gives back the exact canonical form."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_path(self.path)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``text`` strictly; raise InvalidSpiffeIdError with the reason otherwise."""
        # surrogatepass: a lone surrogate must reach the character check, not raise UnicodeError.
        if len(text.encode(errors="surrogatepass")) > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(f"SPIFFE ID longer than {MAX_ID_LENGTH} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeIdError(f"{text!r} is not a SPIFFE ID: it must start with spiffe://")
        rest = text[len(SCHEME_PREFIX) :]
        trust_domain, slash, path = rest.partition("/")
        try:
            return cls(trust_domain, slash + path)
        except InvalidSpiffeIdError as error:
            raise InvalidSpiffeIdError(f"{text!r} is not a valid SPIFFE ID: {error}") from None

    @classmethod
    def for_workload(
        cls, trust_domain: str, *, env: str, zone: str, team: str, service: str
    ) -> SpiffeId:
        """The ztbank scheme: ``/env/<env>/zone/<zone>/team/<team>/svc/<service>``."""
        # A '/' inside a component would still yield a syntactically valid ID, but one that
        # breaks the scheme's fixed shape.
        for label, value in (("env", env), ("zone", zone), ("team", team), ("service", service)):
            if "/" in value:
                raise InvalidSpiffeIdError(f"{label} {value!r} must be a single path segment")
        return cls(trust_domain, f"/env/{env}/zone/{zone}/team/{team}/svc/{service}")

    @property
    def is_trust_domain_id(self) -> bool:
        """True for ``spiffe://td`` itself, which names the trust domain, never a workload."""
        return self.path == ""

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"
