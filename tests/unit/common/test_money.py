from typing import Any

import pytest

from services.common.errors import CommonError
from services.common.money import (
    MAX_MINOR_UNITS,
    InvalidAmountError,
    UnsupportedCurrencyError,
    currency_exponent,
    format_amount,
    parse_amount,
)


@pytest.mark.parametrize(
    ("text", "minor"),
    [
        ("12.34", 1234),
        ("0.01", 1),
        ("0.1", 10),
        ("1.5", 150),
        ("1000", 100_000),
        ("1000.00", 100_000),
        ("0.10", 10),
        ("100000000000", MAX_MINOR_UNITS),  # exactly the ceiling
        ("99999999999.99", MAX_MINOR_UNITS - 1),
    ],
)
def test_parses_plain_decimals_into_minor_units(text: str, minor: int) -> None:
    assert parse_amount(text, "CNY") == minor


@pytest.mark.parametrize(
    "text",
    [
        "0.001",  # finer than a fen
        "1.005",
        "12.340",  # even trailing zeros beyond the currency's precision
        "1e3",  # exponent notation
        "1E3",
        "1.5e2",
        "-5",
        "-0.01",
        "+5",
        "NaN",
        "nan",
        "Infinity",
        "inf",
        "-Infinity",
        "sNaN",
        "abc",
        "",
        ".",
        ".5",
        "5.",
        "1..2",
        "1.2.3",
        "01",  # one spelling per amount
        "00.5",
        " 1",
        "1 ",
        "1\n",
        "\t1",
        "1 000",
        "1_000",  # Decimal() accepts underscores
        "1,00",
        "\u0661\u0662",  # Arabic-Indic digits, which Decimal() accepts
        "\uff11",  # fullwidth 1
        "0x10",
        "1/2",
    ],
)
def test_refuses_anything_but_a_plain_decimal(text: str) -> None:
    with pytest.raises(InvalidAmountError):
        parse_amount(text, "CNY")


@pytest.mark.parametrize("text", ["0", "0.0", "0.00"])
def test_refuses_zero(text: str) -> None:
    with pytest.raises(InvalidAmountError, match="greater than zero"):
        parse_amount(text, "CNY")


@pytest.mark.parametrize(
    "text", ["100000000000.01", "100000000001", "9" * 20, "1" + "0" * 400, "1" * 5000]
)
def test_refuses_more_than_the_ceiling(text: str) -> None:
    with pytest.raises(InvalidAmountError, match="too large"):
        parse_amount(text, "CNY")


@pytest.mark.parametrize("value", [12.34, 1, 0.1, None, b"1.00"])
def test_refuses_non_strings(value: Any) -> None:
    with pytest.raises(InvalidAmountError, match="decimal string"):
        parse_amount(value, "CNY")


@pytest.mark.parametrize("currency", ["USD", "cny", "", "CNY "])
def test_refuses_unknown_currencies(currency: str) -> None:
    with pytest.raises(UnsupportedCurrencyError):
        parse_amount("1.00", currency)
    with pytest.raises(UnsupportedCurrencyError):
        format_amount(100, currency)


def test_errors_are_value_errors_of_the_common_root() -> None:
    assert issubclass(InvalidAmountError, CommonError)
    assert issubclass(InvalidAmountError, ValueError)
    assert issubclass(UnsupportedCurrencyError, CommonError)


def test_cny_has_two_decimals() -> None:
    assert currency_exponent("CNY") == 2


@pytest.mark.parametrize(
    ("minor", "text"),
    [
        (1234, "12.34"),
        (1, "0.01"),
        (10, "0.10"),
        (100_000, "1000.00"),
        (0, "0.00"),
        (-5, "-0.05"),
        (-1234, "-12.34"),
        (2**63 - 1, "92233720368547758.07"),  # int64 ceiling of the ledger, no exponent form
        (-(2**63), "-92233720368547758.08"),
    ],
)
def test_formats_minor_units_as_decimal_strings(minor: int, text: str) -> None:
    assert format_amount(minor, "CNY") == text


@pytest.mark.parametrize("minor", [1, 99, 100, 12345, MAX_MINOR_UNITS])
def test_round_trips(minor: int) -> None:
    assert parse_amount(format_amount(minor, "CNY"), "CNY") == minor
