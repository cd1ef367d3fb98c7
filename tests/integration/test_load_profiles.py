"""The locust load profiles (``make load``) against a private sandbox stack.

One sandbox stack (``services.stack.sandbox``) for the module, in a clean environment; a teller
SVID minted with ``ztbank svid mint`` as ``make load`` does; locust run headless as a subprocess
with the same command line (``loadtest.run.LocustRun``).  The mixed profile must see no failure
and reach every endpoint; with the wrong expected gateway identity every request must fail
before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.report import EndpointStats, read_failures, read_stats
from loadtest.run import LocustRun, MintedSvid, gateway_url, mint_teller_svid, stack_environment
from services.stack.native import NativeStack
from services.stack.sandbox import sandbox_stack
from tests.support.helpers import clean_environment, scrub_environment

pytestmark = pytest.mark.integration

USERS = 4
SECONDS = 8
ENDPOINTS = {
    ("POST", "/v1/tokens"),
    ("GET", "/v1/accounts"),
    ("GET", "/v1/accounts/[id]/transactions"),
    ("POST", "/v1/transfers"),
}


@pytest.fixture(scope="module")
def stack() -> Iterator[NativeStack]:
    env = pytest.MonkeyPatch()
    try:
        scrub_environment(env)  # the stack's processes inherit this process's environment
        with sandbox_stack() as native:
            yield native
    finally:
        env.undo()


@pytest.fixture(scope="module")
def environment(stack: NativeStack) -> dict[str, str]:
    return stack_environment(stack.settings, clean_environment())


@pytest.fixture(scope="module")
def teller_svid(
    stack: NativeStack, environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> MintedSvid:
    return mint_teller_svid(tmp_path_factory.mktemp("svid") / "teller", stack.settings, environment)


def _by_endpoint(stats: list[EndpointStats]) -> dict[tuple[str, str], EndpointStats]:
    return {(s.method, s.name): s for s in stats if s.method}


@pytest.mark.timeout(60)
def test_mixed_profile_has_no_failure_and_reaches_every_endpoint(
    stack: NativeStack, environment: dict[str, str], teller_svid: MintedSvid, tmp_path: Path
) -> None:
    run = LocustRun(
        profile="mixed",
        users=USERS,
        seconds=SECONDS,
        host=gateway_url(stack.settings),
        csv_prefix=tmp_path / "mixed",
        svid_dir=teller_svid.directory,
        spawn_rate=USERS,
        html_report=tmp_path / "mixed.html",
    )
    status = run.run(environment)

    stats = read_stats(run.csv_prefix)
    failures = read_failures(run.csv_prefix)
    assert status == 0, f"locust exited {status}; failures: {failures}"
    endpoints = _by_endpoint(stats)
    assert set(endpoints) == ENDPOINTS
    for endpoint, entry in endpoints.items():
        assert entry.requests > 0, f"{endpoint} got no request"
        assert entry.failures == 0, f"{endpoint}: {entry.failures} failed; {failures}"
    # Every user obtained one customer token at start: 10 min tokens need no renewal here.
    assert endpoints[("POST", "/v1/tokens")].requests == USERS
    assert failures == []
    # locust's own report, for people: its charts and the same endpoints.
    html = (tmp_path / "mixed.html").read_text()
    assert "Locust" in html
    assert all(name in html for _, name in ENDPOINTS)


@pytest.mark.timeout(60)
def test_users_refuse_a_gateway_that_is_not_the_expected_one(
    stack: NativeStack, environment: dict[str, str], teller_svid: MintedSvid, tmp_path: Path
) -> None:
    # Same certificates, but the users expect the gateway of another trust domain: OpenSSL
    # accepts the chain (bundle.pem), the SPIFFE ID check after the handshake must not.
    run = LocustRun(
        profile="reads",
        users=1,
        seconds=5,  # at least one request even on a busy machine (locust starts slowly)
        host=gateway_url(stack.settings),
        csv_prefix=tmp_path / "wrong",
        svid_dir=teller_svid.directory,
        extra_env={"ZTBANK_TRUST_DOMAIN": "elsewhere.example"},
    )
    status = run.run(environment)

    stats = read_stats(run.csv_prefix)
    failures = read_failures(run.csv_prefix)
    assert status == 1
    total = next(s for s in stats if not s.method)
    assert total.requests > 0
    assert total.failures == total.requests, stats
    assert failures
    assert all(f.error.startswith("gateway identity") for f in failures), failures
