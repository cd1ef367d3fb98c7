"""The SVIDs the running issuer hands out pass verifiers that know nothing of SPIFFE:
``cryptography``'s X.509 path validation and ``openssl verify -x509_strict``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509

from services.common.identity.workloads import GATEWAY, RISK, TELLER, TRANSFER_ENGINE
from tests.e2e.conftest import E2EStack
from tests.support.strict_verifiers import cryptography_verifies, openssl_strict_verify

pytestmark = pytest.mark.e2e

WORKLOADS = [w.name for w in (TELLER, GATEWAY, TRANSFER_ENGINE, RISK)]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_issued_svids_pass_strict_verifiers(stack: E2EStack, workload: str) -> None:
    svid = stack.svid(workload)
    leaf, intermediates = svid.leaf, svid.chain[1:]
    subjects = cryptography_verifies(leaf, intermediates, svid.bundle, now=datetime.now(UTC))
    assert subjects[0] == x509.UniformResourceIdentifier(stack.spiffe_id(workload))
    for purpose in ("sslclient", "sslserver"):
        result = openssl_strict_verify(leaf, intermediates, svid.bundle, purpose=purpose)
        assert result.returncode == 0, f"{purpose}: {result.stdout}{result.stderr}"
