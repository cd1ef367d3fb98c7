"""The mis-issued lab's cases break exactly the rule they are named after.

Each case is checked by the same X509-SVID verification the services run, against a CA made
here: the control and the ID outside the policy are valid SVIDs (the policy refuses the latter),
every other case fails for its own reason.
"""

import pytest

from services.common.errors import CommonError
from services.common.identity.x509svid import verify_x509_svid
from services.labs.misissued import Case, build_leaf, cases, impostor_ca

TD = "ztbank.example"
EXPECTED_FAILURE = {
    "signed by a foreign CA": "does not chain to the trust bundle",
    "two URI SANs": "exactly one URI SAN, found 2",
    "no URI SAN": "exactly one URI SAN, found 0",
    "ID of another trust domain": "is not in trust domain",
    "leaf is a CA": "leaf is a CA certificate",
    "no clientAuth usage": "lacks clientAuth",
    "expired": "leaf has expired",
    "not yet valid": "leaf is not yet valid",
}
VALID = {"control: a well-formed SVID from the same CA", "an ID outside the policy"}


def test_every_case_is_either_valid_or_has_a_known_flaw() -> None:
    assert {c.name for c in cases(TD)} == VALID | set(EXPECTED_FAILURE)
    assert [c.name for c in cases(TD) if c.served] == [
        "control: a well-formed SVID from the same CA"
    ]


@pytest.mark.parametrize("case", cases(TD), ids=lambda c: c.name)
def test_each_case_breaks_only_its_own_rule(case: Case) -> None:
    trusted = impostor_ca(TD)  # stands in for the issuer's signing CA
    signer = impostor_ca(TD) if case.foreign else trusted
    leaf, _ = build_leaf(case.spec, signer)
    chain = [leaf, signer.certificate]
    if case.name in VALID:
        verify_x509_svid(chain, [trusted.certificate], trust_domain=TD)
    else:
        with pytest.raises(CommonError, match=EXPECTED_FAILURE[case.name]):
            verify_x509_svid(chain, [trusted.certificate], trust_domain=TD)
