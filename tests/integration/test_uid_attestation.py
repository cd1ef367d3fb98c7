"""unix:uid attestation on one shared Workload API socket, as the compose stack uses it.

In compose every service runs as its own uid and the issuer tells them apart by SO_PEERCRED on
one socket.  Here real processes of other uids (children switched with ``user=``, as the e2e
harness does inside the compose network) ask a real issuer: each gets the SVID of its own entry,
and a uid without an entry gets nothing.  Switching uid needs root; CI runs as root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.identity.as_uid import fetch_svid_as
from services.common.identity.source import SvidUnavailableError
from services.common.identity.x509svid import verify_x509_svid
from tests.integration.conftest import TRUST_DOMAIN, IssuerFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")

GATEWAY_UID, RISK_UID, STRANGER_UID, GROUP = 10001, 10003, 10009, 10000
GATEWAY = f"spiffe://{TRUST_DOMAIN}/env/prod/zone/az1/team/channels/svc/gateway"
RISK = f"spiffe://{TRUST_DOMAIN}/env/prod/zone/az1/team/risk/svc/risk"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid may enter, like the compose stack's workload-api volume."""
    directory = Path(tempfile.mkdtemp(prefix="ztu", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_each_uid_gets_its_own_svid_on_one_shared_socket(
    issuer_factory: IssuerFactory, shared_dir: Path
) -> None:
    socket_uri = f"unix://{shared_dir / 'workload.sock'}"
    issuer = issuer_factory(SPIFFE_ENDPOINT_SOCKET=socket_uri)
    issuer.create_entry(GATEWAY, f"unix:uid:{GATEWAY_UID}")
    issuer.create_entry(RISK, f"unix:uid:{RISK_UID}")

    for uid, expected in ((GATEWAY_UID, GATEWAY), (RISK_UID, RISK)):
        material = fetch_svid_as(uid, GROUP, socket_uri, TRUST_DOMAIN)
        assert str(material.spiffe_id) == expected
        verified = verify_x509_svid(material.chain, material.bundle, trust_domain=TRUST_DOMAIN)
        assert str(verified) == expected

    with pytest.raises(SvidUnavailableError, match=f"uid {STRANGER_UID}"):
        fetch_svid_as(STRANGER_UID, GROUP, socket_uri, TRUST_DOMAIN, timeout=2)
