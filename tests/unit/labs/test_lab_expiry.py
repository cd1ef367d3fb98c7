"""The expiry lab's audit step: what it says and whether it passes for the refusals a run can
see (the e2e suite runs the whole lab against a stack; the race below is rare there)."""

from __future__ import annotations

from services.labs.expiry import audited_refusals

HANDSHAKE = (
    "TLS handshake failed: CERTIFICATE_VERIFY_FAILED: certificate verify failed:"
    " certificate has expired"
)
CLOSED = "certificate expired: connection closed"


def step(reasons: list[str | None]) -> tuple[bool, list[str]]:
    said: list[str] = []
    return audited_refusals(reasons, said.append), said


def test_refused_handshakes_are_reported_with_the_rule_that_failed() -> None:
    assert step([HANDSHAKE, HANDSHAKE]) == (
        True,
        [f"  3 the gateway audited a deny: {HANDSHAKE!r}"],
    )


def test_a_connection_made_just_before_notafter_and_closed_at_it_is_named_too() -> None:
    # The race of CI run 16: the first refused connection's handshake came just before notAfter.
    passed, said = step([CLOSED, HANDSHAKE, HANDSHAKE])
    assert passed
    assert said == [
        f"  3 the gateway audited a deny: {HANDSHAKE!r}",
        f"    (the first refused connection, opened before notAfter: {CLOSED!r})",
    ]


def test_a_refusal_without_an_audit_record_fails_the_lab() -> None:
    passed, said = step([HANDSHAKE, None])
    assert not passed
    assert said[-1] == "    1 of 2 refused connections have NO audit record"


def test_without_a_refused_handshake_the_lab_fails() -> None:
    assert step([CLOSED]) == (
        False,
        [
            "  3 the gateway audited NO refused handshake",
            f"    (the first refused connection, opened before notAfter: {CLOSED!r})",
        ],
    )
    assert step([]) == (False, ["  3 the gateway audited NO refused handshake"])
