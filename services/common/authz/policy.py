"""Deny-by-default authorization by the caller's SPIFFE ID, per service and method.

The policy is a JSON file (``infra/policy.json``) re-read when it changes, without a restart:

    {"rules": [{"service": "transfer-engine",
                "methods": ["/ztbank.ledger.v1.TransferEngine/*"],
                "callers": ["spiffe://{trust_domain}/env/prod/zone/az1/team/channels/svc/gateway"]}]}

``methods`` are gRPC full method names or ``"HTTP-METHOD /path"`` for the gateway, with ``*``
wildcards; ``{trust_domain}`` in a caller is replaced by the running trust domain.  Anything not
allowed by a rule is denied.  If the file becomes unreadable or invalid, every request is denied
until it is fixed (fail closed), and the reason is logged and returned with each denial.

The document comes from a ``PolicySource``: the file here (``FilePolicySource``, the native stack)
or Consul KV in the compose stack
(``services.common.discovery.consul.policy_source.ConsulPolicySource``).  Either way the same
parser and the same decisions apply; only where the text lives differs.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import CommonError, InvalidSpiffeIdError
from services.common.identity.spiffe_id import SpiffeId

logger = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 0.5
HEALTH_METHODS = ("/grpc.health.v1.Health/*", "GET /livez", "GET /readyz", "GET /healthz")
_HEALTH = re.compile("|".join(fnmatch.translate(pattern) for pattern in HEALTH_METHODS))
DECISION_CACHE_SIZE = 4096


class ReloadThrottle:
    """Lets a watched file be looked at again at most every RELOAD_CHECK_SECONDS, by one thread
    at a time; the calls in between (every request) pay one clock read and take no lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, checked: float) -> None:
        self._clock = clock
        self._checked = checked
        self._lock = threading.Lock()

    def run_if_due(self, look: Callable[[], object]) -> None:
        now = self._clock()
        if now - self._checked >= RELOAD_CHECK_SECONDS:
            with self._lock:
                if now - self._checked >= RELOAD_CHECK_SECONDS:
                    self._checked = now
                    look()


class PolicyError(CommonError):
    """The policy file is missing or invalid."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class Rule:
    service: str
    methods: tuple[str, ...]
    callers: frozenset[str]


def parse_policy(text: str, trust_domain: str) -> tuple[Rule, ...]:
    try:
        document = json.loads(text)
        rules = []
        for raw in document["rules"]:
            if not isinstance(raw["methods"], list) or not isinstance(raw["callers"], list):
                raise PolicyError("a rule's methods and callers must be JSON lists")
            if not all(isinstance(item, str) for item in (*raw["methods"], *raw["callers"])):
                raise PolicyError("methods and callers must be strings")
            callers = frozenset(
                str(SpiffeId.parse(c.replace("{trust_domain}", trust_domain)))
                for c in raw["callers"]
            )
            methods = tuple(str(m) for m in raw["methods"])
            if not methods or not isinstance(raw["service"], str):
                raise PolicyError("every rule needs a service and at least one method")
            rules.append(Rule(raw["service"], methods, callers))
        return tuple(rules)
    except (ValueError, KeyError, TypeError, InvalidSpiffeIdError) as error:
        raise PolicyError(f"invalid policy: {error}") from None


class PolicySource(Protocol):
    """Where the policy document lives.

    ``stamp()`` is cheap and changes whenever the document may have changed; ``read()`` returns
    the document text.  Both raise ``PolicyError`` or ``OSError`` when the source is unusable,
    which makes ``Policy`` deny everything until they stop raising.
    """

    def describe(self) -> str: ...

    def stamp(self) -> object: ...

    def read(self) -> str: ...


class FilePolicySource:
    """``infra/policy.json``: the stamp is the file's stat()."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def stamp(self) -> object:
        stat = os.stat(self.path)
        # ctime and inode too: an edit that keeps size and mtime (cp -p) must still count.
        return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_size)

    def read(self) -> str:
        return self.path.read_text()


class Policy:
    """Decides in memory; a stamp check at most every RELOAD_CHECK_SECONDS picks up edits."""

    def __init__(self, source: Path | PolicySource, trust_domain: str) -> None:
        self._source = FilePolicySource(source) if isinstance(source, Path) else source
        self._trust_domain = trust_domain
        self._throttle = ReloadThrottle(checked=0.0)
        self._stamp: object = None
        self._rules: tuple[Rule, ...] = ()
        self._broken: str | None = None
        # Decisions by (service, method, caller) for the rules loaded now: replaced, never
        # cleared, on reload, so a decision made under the old rules never lands in it.
        self._decided: dict[tuple[str, str, str], Decision] = {}
        self._reload()
        if self._broken is not None:
            raise PolicyError(self._broken)

    def _reload(self) -> None:
        try:
            stamp = self._source.stamp()
            if stamp == self._stamp and self._broken is None:
                return
            self._rules = parse_policy(self._source.read(), self._trust_domain)
            self._stamp, self._broken = stamp, None
            self._decided = {}
            logger.info(
                "policy loaded from %s: %d rules", self._source.describe(), len(self._rules)
            )
        except (OSError, PolicyError) as error:
            if self._broken is None:
                logger.error(
                    "policy %s unusable, denying everything: %s", self._source.describe(), error
                )
            self._broken = f"policy unavailable: {error}"
            self._stamp = None
            self._decided = {}

    def problem(self) -> str | None:
        """Why every non-health call is denied now (readiness), None while the rules load."""
        self._throttle.run_if_due(self._reload)
        return self._broken

    @property
    def source(self) -> PolicySource:
        return self._source

    def decide(self, service: str, method: str, caller: SpiffeId) -> Decision:
        self._throttle.run_if_due(self._reload)
        decided = self._decided
        key = (service, method, str(caller))
        decision = decided.get(key)
        if decision is None:
            decision = self._decide(*key)
            if len(decided) >= DECISION_CACHE_SIZE:  # gateway methods carry resource IDs
                decided.clear()
            decided[key] = decision
        return decision

    def _decide(self, service: str, method: str, caller: str) -> Decision:
        if _HEALTH.fullmatch(method):
            # Health answers any verified SVID of the trust domain (the peer is already checked).
            return Decision(True, "health check")
        if self._broken is not None:
            return Decision(False, self._broken)
        for rule in self._rules:
            if rule.service != service or caller not in rule.callers:
                continue
            if any(fnmatch.fnmatchcase(method, pattern) for pattern in rule.methods):
                return Decision(True, f"allowed by policy rule for {service}")
        return Decision(False, f"no policy rule allows {caller} to call {service} {method}")
