import pytest

from services.common.risk_decision import RiskDecision as Decision
from services.risk.domain.assessment import (
    DENY_REASONS,
    Assessment,
    Reason,
    RiskAssessor,
    TransferRequest,
    combined_score,
    evaluate,
)
from services.risk.domain.rules import Rules
from services.risk.errors import InvalidTransferError, RiskError

RULES = Rules(
    review_threshold=500_000,
    deny_threshold=5_000_000,
    velocity_max_transfers=5,
    blocked_accounts=frozenset({"acct-mule"}),
    blocked_customers=frozenset({"cust-fraud"}),
)


def transfer(
    amount: int = 100_00,
    *,
    customer: str = "cust-1",
    from_account: str = "acct-1",
    to_account: str = "acct-2",
    currency: str = "CNY",
) -> TransferRequest:
    return TransferRequest(
        transfer_id="t-1",
        customer=customer,
        from_account=from_account,
        to_account=to_account,
        amount_minor=amount,
        currency=currency,
    )


def test_small_transfer_is_allowed_with_no_reasons() -> None:
    assert evaluate(transfer(), RULES, 1) == Assessment(Decision.ALLOW, (), 0)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (499_999, Assessment(Decision.ALLOW, (), 0)),
        (500_000, Assessment(Decision.REVIEW, (Reason.AMOUNT_ABOVE_REVIEW_THRESHOLD,), 40)),
        (4_999_999, Assessment(Decision.REVIEW, (Reason.AMOUNT_ABOVE_REVIEW_THRESHOLD,), 40)),
        (5_000_000, Assessment(Decision.DENY, (Reason.AMOUNT_ABOVE_DENY_THRESHOLD,), 90)),
    ],
)
def test_amount_thresholds_apply_from_the_threshold_itself(
    amount: int, expected: Assessment
) -> None:
    assert evaluate(transfer(amount), RULES, 1) == expected


@pytest.mark.parametrize(("recent", "vetted"), [(5, False), (6, True)])
def test_velocity_reviews_only_beyond_the_maximum(recent: int, vetted: bool) -> None:
    assessment = evaluate(transfer(), RULES, recent)
    if vetted:
        assert assessment == Assessment(Decision.REVIEW, (Reason.VELOCITY_EXCEEDED,), 40)
    else:
        assert assessment.decision is Decision.ALLOW


@pytest.mark.parametrize(
    "request_",
    [transfer(from_account="acct-mule"), transfer(to_account="acct-mule")],
    ids=["from", "to"],
)
def test_blocklisted_account_on_either_side_is_denied(request_: TransferRequest) -> None:
    assert evaluate(request_, RULES, 1) == Assessment(
        Decision.DENY, (Reason.BLOCKLISTED_ACCOUNT,), 100
    )


def test_blocklisted_customer_is_denied() -> None:
    assert evaluate(transfer(customer="cust-fraud"), RULES, 1) == Assessment(
        Decision.DENY, (Reason.BLOCKLISTED_CUSTOMER,), 100
    )


def test_other_currency_is_reviewed_without_amount_rules() -> None:
    assessment = evaluate(transfer(900_000_000, currency="USD"), RULES, 1)
    assert assessment == Assessment(Decision.REVIEW, (Reason.CURRENCY_NOT_SUPPORTED,), 40)


def test_two_review_reasons_stay_review_with_a_higher_score() -> None:
    assessment = evaluate(transfer(500_000), RULES, 6)
    assert assessment == Assessment(
        Decision.REVIEW,
        (Reason.AMOUNT_ABOVE_REVIEW_THRESHOLD, Reason.VELOCITY_EXCEEDED),
        64,
    )


def test_deny_beats_review_and_every_reason_is_listed_in_a_stable_order() -> None:
    request = transfer(5_000_000, customer="cust-fraud", to_account="acct-mule")
    assessment = evaluate(request, RULES, 99)
    assert assessment == Assessment(
        Decision.DENY,
        (
            Reason.BLOCKLISTED_ACCOUNT,
            Reason.BLOCKLISTED_CUSTOMER,
            Reason.AMOUNT_ABOVE_DENY_THRESHOLD,
            Reason.VELOCITY_EXCEEDED,
        ),
        100,
    )


def test_deny_amount_with_velocity_scores_between_deny_and_blocklist() -> None:
    assessment = evaluate(transfer(5_000_000), RULES, 6)
    assert assessment.decision is Decision.DENY
    assert assessment.score == 94


def test_score_bands_agree_with_the_decision() -> None:
    every_review_reason = tuple(r for r in Reason if r not in DENY_REASONS)
    assert combined_score(every_review_reason) < 90
    assert all(combined_score((r,)) >= 90 for r in DENY_REASONS)


def test_reason_codes_are_stable_strings() -> None:
    assert {str(r) for r in Reason} == {
        "blocklisted_account",
        "blocklisted_customer",
        "amount_above_deny_threshold",
        "amount_above_review_threshold",
        "currency_not_supported",
        "velocity_exceeded",
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"amount": 0}, "amount_minor must be positive (got 0)"),
        ({"amount": -5}, "amount_minor must be positive (got -5)"),
        ({"currency": ""}, "currency is required"),
        ({"from_account": " "}, "from_account is required"),
        ({"to_account": ""}, "to_account is required"),
    ],
)
def test_malformed_transfers_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidTransferError) as caught:
        transfer(**fields)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_every_problem_is_named_and_errors_share_the_root() -> None:
    with pytest.raises(RiskError) as caught:
        transfer(0, from_account="", currency="")
    assert str(caught.value) == (
        "amount_minor must be positive (got 0); currency is required; from_account is required"
    )


class FixedRules:
    def __init__(self, rules: Rules) -> None:
        self.rules = rules

    def current(self) -> Rules:
        return self.rules


class RecordingHistory:
    def __init__(self, count: int) -> None:
        self.count = count
        self.calls: list[tuple[str, float]] = []

    def record(self, account: str, window_seconds: float) -> int:
        self.calls.append((account, window_seconds))
        return self.count


def test_assessor_feeds_history_with_every_transfer_and_uses_its_count() -> None:
    history = RecordingHistory(count=6)
    rules = RULES.model_copy(update={"velocity_window_seconds": 30.0})
    assessor = RiskAssessor(FixedRules(rules), history)
    denied = assessor.assess(transfer(customer="cust-fraud"))
    assert denied.reasons == (Reason.BLOCKLISTED_CUSTOMER, Reason.VELOCITY_EXCEEDED)
    assessor.assess(transfer(from_account="acct-9"))
    assert history.calls == [("acct-1", 30.0), ("acct-9", 30.0)]
