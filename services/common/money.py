"""Money on the wire: decimal strings such as ``"12.34"`` <-> integer minor units (fen for CNY).

Amounts travel as strings because a JSON number is a binary float to most clients; ``0.1 + 0.2``
must never reach the ledger.  Parsing is deliberately narrower than ``Decimal()``: plain ASCII
digits with an optional fraction no longer than the currency allows, so that exponents, signs,
``NaN``, whitespace and non-ASCII digits (which ``Decimal`` would happily accept) are refused
instead of being interpreted.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, InvalidOperation, Rounded

from services.common.errors import CommonError

# ISO 4217 minor-unit exponents of the currencies the bank holds.
_EXPONENTS = {"CNY": 2}
MAX_MINOR_UNITS = 10**13
# Longer than any amount within MAX_MINOR_UNITS; checked before the regex and Decimal see it.
_MAX_TEXT_LENGTH = 24
# [0-9], not \d: \d also matches non-ASCII digits.  No leading zeros, so one amount has one
# spelling.
_AMOUNT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.([0-9]+))?")


class UnsupportedCurrencyError(CommonError, ValueError):
    """The currency code is not one the bank holds."""


class InvalidAmountError(CommonError, ValueError):
    """A decimal amount string is malformed, not positive, too precise or too large."""


def _exact() -> Context:
    # A fresh context per call: contexts record flags, so a shared one would be shared state.
    return Context(prec=40, traps=[Inexact, Rounded, InvalidOperation])


def currency_exponent(currency: str) -> int:
    """Number of decimal places of ``currency`` (2 for CNY)."""
    try:
        return _EXPONENTS[currency]
    except KeyError:
        raise UnsupportedCurrencyError(f"unsupported currency {currency!r}") from None


def parse_amount(text: str, currency: str) -> int:
    """``"12.34"`` in CNY -> 1234; anything but a plain positive decimal within limits fails."""
    exponent = currency_exponent(currency)
    # Callers hand over decoded JSON; a float or int here means the client sent a JSON number.
    if not isinstance(text, str):
        raise InvalidAmountError('amount must be a decimal string such as "12.34"')
    if len(text) > _MAX_TEXT_LENGTH:
        raise InvalidAmountError("amount is too large")
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise InvalidAmountError(f'amount {text!r} is not a plain positive decimal such as "12.34"')
    fraction = match.group(1) or ""
    if len(fraction) > exponent:
        raise InvalidAmountError(
            f"amount {text!r} has more than {exponent} decimal places for {currency}"
        )
    minor = int(Decimal(text).scaleb(exponent, context=_exact()))
    if minor <= 0:
        raise InvalidAmountError("amount must be greater than zero")
    if minor > MAX_MINOR_UNITS:
        raise InvalidAmountError("amount is too large")
    return minor


def format_amount(minor: int, currency: str) -> str:
    """1234 in CNY -> ``"12.34"``; negative amounts (debits) keep their sign."""
    exponent = currency_exponent(currency)
    return format(Decimal(minor).scaleb(-exponent, context=_exact()), "f")
