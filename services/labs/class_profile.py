"""The class profile (``make class``, ``ztbank lab class``): the issuer lifetimes under which
every lab runs in seconds, and the restart of the native stack with them, balances kept.

What each lab needs of them (docs/labs.md, and each lab's module):

- rotation waits for every service to renew its SVID twice, at 40-50 % of the SVID's life, and
  outage waits for the services to fail closed once their SVIDs or CRLs lapse: both take a few
  SVID lifetimes, so SVIDs of 20 s (the e2e suites' TTL; 5 minutes by default);
- the CRL TTL is at most the SVID TTL; the outage lab takes it to be the SVID TTL ("SVIDs and
  CRLs live 20 s here"), and its class sees the gateway's breaker open first, on the engine's
  ageing SVID, then the CRLs lapse.  10 s would save about 6 s of that lab, and have every
  refusal be a stale CRL;
- the upstream lab asks the issuer for its next signing CA now (the admin API's ``RenewCA``),
  so it needs no short CA.  (Before ``RenewCA`` it waited for the issuer's own renewal, half-way
  through the CA's life, on a stack of 2-minute CAs that only ``make reset`` gave: the issuer
  keeps its CAs across restarts, ``ZTBANK_HOME/issuer/authority.json``, and a new CA TTL applies
  to the CAs it signs from then on.)  A short CA would hurt it: the lab checks that the trust
  bundle does not change while the upstream is down, and with CAs of minutes a retired one
  expires out of the bundle every minute or so: run back to back on 2-minute CAs, it passed
  its first 15 runs, then failed 7 of the next 8, once the CAs it had renewed began to expire.
  So the issuer's default day.

``start_class_stack`` stops the native stack (``down``: state under ZTBANK_HOME is kept, so
balances, history and entries are) and starts it with the profile, holding the lab lock
meanwhile (a lab running is not restarted under it), and checks what the issuer now issues.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from services.common.durations import format_duration, parse_duration
from services.common.errors import CommonError
from services.common.identity.workloads import TELLER
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.errors import IssuerError
from services.labs.errors import LabError, LabUsageError
from services.labs.support import LabLock, Say
from services.stack.native import (
    NativeStack,
    SettingsConflictError,
    StackError,
    StackSettings,
    workload_svid,
)


@dataclass(frozen=True)
class ProfileSetting:
    field: str  # the StackSettings field (and upstream.json key)
    variable: str
    value: str
    why: tuple[str, ...]  # lines of the output of ``make class``

    @property
    def duration(self) -> timedelta:
        return parse_duration(self.value)


CLASS_PROFILE: tuple[ProfileSetting, ...] = (
    ProfileSetting(
        "svid_ttl",
        "ZTBANK_SVID_TTL",
        "20s",
        (
            "rotation waits for two renewals of each service, at 40-50 % of an SVID's",
            "life: ~15 s (~5 min with the default 5m); outage waits for the SVIDs and",
            "CRLs to lapse: ~30 s (~10 min). The e2e suites' TTL",
        ),
    ),
    ProfileSetting(
        "crl_ttl",
        "ZTBANK_CRL_TTL",
        "20s",
        (
            "the SVID TTL (its most), as the outage lab takes it: the gateway's breaker",
            "opens on the engine's ageing SVID first, then the CRLs lapse (10 s would",
            "save ~6 s there, and have every refusal be a stale CRL)",
        ),
    ),
    ProfileSetting(
        "ca_ttl",
        "ZTBANK_CA_TTL",
        "1d",
        (
            "the default: the upstream lab has the issuer renew its CA now (RenewCA);",
            "with CAs of minutes, one would expire out of the trust bundle while that",
            "lab checks that the bundle stays as it is. CAs survive a restart: no reset",
        ),
    ),
)
CLASS_SVID_TTL = next(s.duration for s in CLASS_PROFILE if s.field == "svid_ttl")
CLASS_CA_TTL = next(s.duration for s in CLASS_PROFILE if s.field == "ca_ttl")


def profile_settings(settings: StackSettings) -> StackSettings:
    """``settings`` with the class profile's lifetimes."""
    return settings.model_copy(update={setting.field: setting.value for setting in CLASS_PROFILE})


def describe_profile(say: Say) -> None:
    """The profile's values, and why each."""
    width = max(len(f"{s.variable}={s.value}") for s in CLASS_PROFILE)
    for setting in CLASS_PROFILE:
        assignment = f"{setting.variable}={setting.value}"
        say(f"  {assignment:<{width}}  {setting.why[0]}")
        for line in setting.why[1:]:
            say(f"  {'':<{width}}  {line}")


def _environment_overridden(say: Say) -> None:
    """Never ignored silently: a lifetime of the environment that the profile replaces."""
    for setting in CLASS_PROFILE:
        text = os.environ.get(setting.variable)
        if text and text.strip() != setting.value:
            say(f"  (the environment's {setting.variable}={text} is not used: the profile's is)")


def _signing_ca(settings: StackSettings) -> list[str]:
    """The issuer's active signing CA and what it was signed for (it keeps its CAs across
    restarts, and a CA TTL applies to those it signs next), one line each."""
    try:
        active = AuthorityFile(settings.home / "issuer" / "authority.json").load().active
    except IssuerError as error:
        return [f"its signing CA cannot be read: {error}"]
    if active is None:
        return ["it has no signing CA yet"]
    lifetime = active.expires - active.ca_cert.not_valid_before_utc
    signed_for = format_duration(timedelta(seconds=round(lifetime.total_seconds())))
    subject = active.ca_cert.subject.rfc4514_string().split(",", 1)[0].removeprefix("CN=")
    until = f"{active.expires:%Y-%m-%d %H:%M} UTC"
    lines = [f"its signing CA ({subject}) was signed for {signed_for}, until {until}"]
    if lifetime < CLASS_CA_TTL / 2:
        lines.append(
            f"(signed under an earlier ZTBANK_CA_TTL: the issuer keeps its CAs across restarts;"
            f" the CAs of {signed_for} leave the trust bundle as they expire, within"
            f" {signed_for}, and the upstream lab fails if one does while it runs)"
        )
    return lines


def start_class_stack(settings: StackSettings, say: Say) -> bool:
    """Stop the native stack and start it with the class profile (balances kept), saying the
    profile's values and why; True when the issuer then issues SVIDs of the profile's TTL.
    Refused (LabUsageError, one line, nothing changed) beside the compose stack, for another
    upstream than the stack's, and while a lab runs."""
    if settings.stack_kind != "native":
        raise LabUsageError(
            "make class restarts the native stack; for the compose stack:"
            " ZTBANK_SVID_TTL=20s MODE=compose make up"
        )
    stack = NativeStack(profile_settings(settings))
    try:
        upstream = stack.upstream()  # another one than the stack's needs `make reset`: refused
    except StackError as error:
        raise LabUsageError(str(error)) from None
    with LabLock.take(settings, "class", "cli"):
        say("class profile: the issuer lifetimes under which every lab runs in seconds")
        describe_profile(say)
        _environment_overridden(say)
        say(f"restarting the native stack in ZTBANK_HOME={settings.home} ({upstream} upstream)")
        say("  with them: down, then up; balances, history and entries are kept (no reset)")
        stopped = stack.down()
        say(f"  stopped: {', '.join(stopped)}" if stopped else "  nothing was running")
        try:
            status = stack.up()
        except SettingsConflictError as error:
            raise LabUsageError(str(error)) from None
        except StackError as error:
            raise LabError(str(error)) from None
        healthy = [name for name, probe in status.services.items() if probe.healthy]
        say(f"  started: issuer, {', '.join(healthy)}: healthy")
        try:
            svid = workload_svid(settings, TELLER.name)
        except CommonError as error:
            raise LabError(f"the issuer gives the teller no SVID: {error}") from None
        lifetime = round(svid.lifetime.total_seconds())
        wanted = round(CLASS_SVID_TTL.total_seconds())
        say(f"  the issuer issues SVIDs of {lifetime} s now (the teller's, {svid.serial[:12]}…);")
        for line in _signing_ca(settings):
            say(f"  {line}")
    if lifetime != wanted:
        say(f"class stack NOT as profiled: SVIDs of {lifetime} s, not {wanted} s")
        return False
    say("class stack ready: `make lab-all` runs every lab in turn, `make lab-NAME` one of them")
    return True
