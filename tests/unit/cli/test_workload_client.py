"""The example client's own checks of the gateway (examples/python-client): the SPIFFE ID it
reads from the certificate, and its revocation check against CRLs served over HTTP, which
must fail closed as the CLI's does."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.crl import CrlServer, build_crl, crl_server
from tests.support.pki import (
    WORKLOAD_ID,
    Issued,
    create_intermediate_ca,
    create_leaf,
    create_root_ca,
)

CLIENT = Path(__file__).resolve().parents[3] / "examples" / "python-client" / "client.py"


def load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ztbank_example_client", CLIENT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client()


@pytest.fixture(scope="module")
def root() -> Issued:
    return create_root_ca()


@pytest.fixture(scope="module")
def signing_ca(root: Issued) -> Issued:
    return create_intermediate_ca(root)


@pytest.fixture(scope="module")
def gateway(signing_ca: Issued) -> Issued:
    return create_leaf(signing_ca)


@pytest.fixture
def crls() -> Iterator[CrlServer]:
    with crl_server() as server:
        yield server


def check(gateway: Issued, authorities: list[Issued], server: CrlServer) -> None:
    client.check_revocation(gateway.certificate, [a.certificate for a in authorities], server.url)


def test_a_gateway_that_a_fresh_crl_of_its_ca_does_not_list_is_served(
    root: Issued, signing_ca: Issued, gateway: Issued, crls: CrlServer
) -> None:
    crls.publish(build_crl(root), build_crl(signing_ca))
    check(gateway, [root, signing_ca], crls)


@pytest.mark.parametrize(
    ("publish", "message"),
    [
        ("revoked", "is revoked"),
        ("stale", "no fresh CRL of the gateway's CA"),
        ("foreign", "no fresh CRL of the gateway's CA"),
        ("none", "no fresh CRL of the gateway's CA"),
    ],
)
def test_revoked_or_unknown_status_is_refused(
    root: Issued,
    signing_ca: Issued,
    gateway: Issued,
    crls: CrlServer,
    publish: str,
    message: str,
) -> None:
    past = datetime.now(UTC) - timedelta(hours=1)
    published = {
        "revoked": [build_crl(signing_ca, [gateway.certificate])],
        # right issuer name, signed by another key: proves nothing
        "foreign": [build_crl(Issued(signing_ca.certificate, create_root_ca().key))],
        "stale": [build_crl(signing_ca, this_update=past, validity=timedelta(minutes=1))],
        "none": [],
    }[publish]
    crls.publish(*published)
    with pytest.raises(client.ClientError, match=message):
        check(gateway, [root, signing_ca], crls)


def test_a_certificate_no_ca_of_the_bundle_issued_is_refused(
    root: Issued, gateway: Issued, crls: CrlServer
) -> None:
    crls.publish(build_crl(root))
    with pytest.raises(client.ClientError, match="no CA of the bundle issued"):
        check(gateway, [root], crls)


def test_an_unreachable_issuer_is_refused(
    signing_ca: Issued, gateway: Issued, crls: CrlServer
) -> None:
    crls.stop()
    with pytest.raises(client.ClientError, match="cannot fetch the CRLs"):
        check(gateway, [signing_ca], crls)


def test_the_spiffe_id_is_the_one_uri_san(signing_ca: Issued, gateway: Issued) -> None:
    assert client.spiffe_id_of(gateway.certificate) == WORKLOAD_ID
    two = create_leaf(signing_ca, uri_sans=(WORKLOAD_ID, WORKLOAD_ID + "x"))
    assert client.spiffe_id_of(two.certificate) == ""
