from datetime import timedelta

import pytest

from services.common.durations import format_duration, parse_duration
from services.common.errors import InvalidDurationError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("20s", timedelta(seconds=20)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("0.5m", timedelta(seconds=30)),
        (" 20s ", timedelta(seconds=20)),
        ("20 s", timedelta(seconds=20)),
        ("90m", timedelta(minutes=90)),
    ],
)
def test_parses_number_and_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "5",  # a bare number is ambiguous: seconds? minutes?
        "300",
        "s",
        "5 minutes",
        "5min",
        "5M",
        "5S",
        "5mm",
        "5m30s",
        "-5s",
        "+5s",
        "1e3s",
        ".5s",
        "5.s",
        "0x10s",
        "five seconds",
        "5s\n5s",
    ],
)
def test_refuses_malformed_durations(text: str) -> None:
    with pytest.raises(InvalidDurationError, match="invalid duration") as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)
    assert "e.g. 20s" in str(caught.value)


@pytest.mark.parametrize("text", ["0s", "0ms", "0.0s", "0d"])
def test_refuses_zero(text: str) -> None:
    with pytest.raises(InvalidDurationError, match="greater than zero"):
        parse_duration(text)


def test_sub_microsecond_duration_is_never_zero() -> None:
    try:
        value = parse_duration("0.0001ms")
    except InvalidDurationError:
        return
    assert value > timedelta(0)


def test_invalid_duration_is_a_value_error() -> None:
    # Settings validators rely on this to turn the error into a field error.
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(days=2), "2d"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=36), "36h"),
        (timedelta(minutes=5), "5m"),
        (timedelta(minutes=90), "90m"),
        (timedelta(seconds=20), "20s"),
        (timedelta(seconds=90), "90s"),
        (timedelta(milliseconds=1500), "1500ms"),
        (timedelta(milliseconds=500), "500ms"),
    ],
)
def test_formats_in_the_largest_whole_unit(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize(
    "value",
    [
        timedelta(milliseconds=1),
        timedelta(milliseconds=999),
        timedelta(seconds=5),
        timedelta(seconds=61),
        timedelta(minutes=10),
        timedelta(hours=25),
        timedelta(days=365),
    ],
)
def test_format_round_trips_through_parse(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value
