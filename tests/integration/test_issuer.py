"""The issuer as a user meets it: the stock py-spiffe client, raw gRPC and the ``ztbank`` CLI.

Every test starts a real ``ztbank issuer run`` (see conftest) and asserts only what a workload or
an operator can observe: SVIDs, bundles, gRPC statuses, exit codes, files.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient, X509Source, X509Svid
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.workloadapi.errors import FetchX509SvidError, ValidateJwtSvidError
from spiffe.workloadapi.x509_context import X509Context

from services.common.errors import SvidVerificationError
from services.common.identity.x509svid import verify_x509_svid
from tests.integration.conftest import TRUST_DOMAIN, IssuerFactory, IssuerProcess
from tests.support.helpers import one_line, wait_until

pytestmark = pytest.mark.integration

TD = TrustDomain(TRUST_DOMAIN)
TELLER = f"spiffe://{TRUST_DOMAIN}/env/test/zone/az1/team/retail/svc/teller"
LEDGER = f"spiffe://{TRUST_DOMAIN}/env/test/zone/az1/team/core/svc/ledger"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/env/test/zone/az1/team/edge/svc/gateway"
HEADER = ("workload.spiffe.io", "true")
SOURCE_TIMEOUT = 10.0
RPC_TIMEOUT = 10.0
OUR_UID = f"unix:uid:{os.getuid()}"
# A uid that is certainly not the test process's.
OTHER_UID = f"unix:uid:{4242 if os.getuid() != 4242 else 4243}"


# -- helpers ----------------------------------------------------------------------------------


def spki(certificate_or_key: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a certificate's key or of a private key's public half."""
    data: bytes = certificate_or_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def authorities(context: X509Context) -> list[x509.Certificate]:
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TD)
    assert bundle is not None, "no X.509 bundle for the trust domain in the update"
    return sorted(bundle.x509_authorities, key=fingerprint)


def is_self_signed(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


def common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


# Every certificate spans exactly its TTL, starting min(10s, TTL/10) before it was issued (clock
# skew allowance, taken out of the lifetime).  X.509 times drop the fraction of a second.
MAX_BACKDATE = timedelta(seconds=10)
SECOND = timedelta(seconds=1)


def assert_validity(
    certificate: x509.Certificate,
    ttl: timedelta,
    *,
    issued_after: datetime,
    issued_before: datetime,
) -> None:
    """notAfter - notBefore == ``ttl`` and notBefore is the backdated issue time, which lies in
    [issued_after, issued_before]."""
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    assert not_after - not_before == ttl, f"lifetime {not_after - not_before}, expected {ttl}"
    backdate = min(MAX_BACKDATE, ttl / 10)
    assert issued_after - backdate - SECOND < not_before <= issued_before - backdate, (
        f"notBefore {not_before} is not {backdate} before an issue time in"
        f" [{issued_after}, {issued_before}]"
    )


def x509_context(issuer: IssuerProcess, socket_uri: str | None = None) -> X509Context:
    with X509Source(
        socket_path=socket_uri or issuer.socket_uri, timeout_in_seconds=SOURCE_TIMEOUT
    ) as source:
        return source.get_x509_context()


@dataclass(frozen=True)
class RawResult:
    code: Any  # grpc.StatusCode
    details: str
    response: workload_pb2.X509SVIDResponse | None


def raw_fetch_x509(socket: Path, *, with_header: bool = True) -> RawResult:
    """One FetchX509SVID with grpcio and py-spiffe's generated stub, no client library logic."""
    channel = grpc.insecure_channel(f"unix://{socket}")
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        responses = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(),
            metadata=[HEADER] if with_header else [],
            timeout=RPC_TIMEOUT,
        )
        try:
            first = next(responses)
        except grpc.RpcError as error:
            return RawResult(error.code(), str(error.details()), None)
        finally:
            responses.cancel()
        return RawResult(grpc.StatusCode.OK, "", first)
    finally:
        channel.close()


def assert_refused(result: RawResult, code: Any, log: str) -> None:
    assert result.code == code, (
        f"expected {code}, got {result.code} ({result.details!r}); issuer log:\n{log}"
    )


# -- 1. an SVID for a registered workload ----------------------------------------------------


def test_x509_source_gets_a_verifiable_svid_for_our_uid(issuer: IssuerProcess) -> None:
    issuer.create_entry(TELLER, OUR_UID)
    requested = datetime.now(UTC)

    context = x509_context(issuer)
    received = datetime.now(UTC)

    svid = context.default_svid
    assert str(svid.spiffe_id) == TELLER
    bundle = authorities(context)
    assert str(verify_x509_svid(svid.cert_chain, bundle, trust_domain=TRUST_DOMAIN)) == TELLER
    assert spki(svid.private_key) == spki(svid.leaf), "private key does not match the leaf"
    # Exactly the 10s TTL, notBefore backdated 1s (a tenth of it) for clock skew.
    assert_validity(
        svid.leaf, timedelta(seconds=10), issued_after=requested, issued_before=received
    )


# -- 2. rotation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: datetime
    svid: X509Svid


def test_x509_svid_rotates_with_fresh_serial_and_key_before_55_percent(
    issuer: IssuerProcess,
) -> None:
    ttl = timedelta(seconds=10)
    issuer.create_entry(TELLER, OUR_UID)
    arrivals: list[Arrival] = []
    lock = threading.Lock()

    def record(context: X509Context) -> None:
        now = datetime.now(UTC)
        svid = context.default_svid
        with lock:
            if all(a.svid.leaf.serial_number != svid.leaf.serial_number for a in arrivals):
                arrivals.append(Arrival(now, svid))

    with X509Source(socket_path=issuer.socket_uri, timeout_in_seconds=SOURCE_TIMEOUT) as source:
        source.subscribe_for_updates(lambda: record(source.get_x509_context()))
        record(source.get_x509_context())

        def three_svids() -> bool:
            with lock:
                return len(arrivals) >= 3

        wait_until(
            three_svids,
            timeout=15.0,
            interval=0.1,
            message=lambda: f"saw {len(arrivals)} SVIDs in 15s, expected 3; log:\n{issuer.log()}",
        )

    with lock:
        seen = list(arrivals)
    assert len({a.svid.leaf.serial_number for a in seen}) == len(seen)
    assert len({spki(a.svid.leaf) for a in seen}) == len(seen), "a rotated SVID reused its key"
    for arrival in seen:
        leaf = arrival.svid.leaf
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == ttl
    for previous, current in itertools.pairwise(seen):
        assert spki(current.svid.private_key) == spki(current.svid.leaf)
        # Rotation is due between 40% and 50% of notBefore..notAfter. Judged by when the issuer
        # issued the new SVID (its notBefore plus the backdate; whole seconds), not by when a
        # busy machine delivered it.
        start = previous.svid.leaf.not_valid_before_utc
        issued = current.svid.leaf.not_valid_before_utc + min(MAX_BACKDATE, ttl / 10)
        assert start + ttl * 0.40 - SECOND <= issued <= start + ttl * 0.50 + SECOND, (
            f"SVID {current.svid.leaf.serial_number:x} was issued {issued - start} after the"
            f" previous one's notBefore, outside 40%..50% of its {ttl} lifetime"
        )
        assert current.at < previous.svid.leaf.not_valid_after_utc


# -- 3. / 4. attestation and the security header ----------------------------------------------


def test_unregistered_workload_is_denied(issuer: IssuerProcess) -> None:
    issuer.create_entry(TELLER, OTHER_UID)

    with (
        WorkloadApiClient(socket_path=issuer.socket_uri, default_timeout=RPC_TIMEOUT) as client,
        pytest.raises(FetchX509SvidError) as refused,
    ):
        client.fetch_x509_svid()
    assert "PERMISSION_DENIED" in str(refused.value), refused.value

    assert_refused(
        raw_fetch_x509(issuer.workload_socket), grpc.StatusCode.PERMISSION_DENIED, issuer.log()
    )


def test_request_without_security_header_is_refused(issuer: IssuerProcess) -> None:
    issuer.create_entry(TELLER, OUR_UID)

    with_header = raw_fetch_x509(issuer.workload_socket)
    assert with_header.code == grpc.StatusCode.OK, with_header.details
    assert with_header.response is not None
    assert [s.spiffe_id for s in with_header.response.svids] == [TELLER]

    without = raw_fetch_x509(issuer.workload_socket, with_header=False)
    assert_refused(without, grpc.StatusCode.INVALID_ARGUMENT, issuer.log())
    assert without.response is None


# -- 5. JWT-SVIDs -----------------------------------------------------------------------------


def test_jwt_svid_fetch_validate_and_bundle(issuer: IssuerProcess) -> None:
    issuer.create_entry(TELLER, OUR_UID)

    with WorkloadApiClient(socket_path=issuer.socket_uri, default_timeout=RPC_TIMEOUT) as client:
        svid = client.fetch_jwt_svid(audience={"bank"})
        assert str(svid.spiffe_id) == TELLER

        validated = client.validate_jwt_svid(svid.token, "bank")
        assert str(validated.spiffe_id) == TELLER
        with pytest.raises(ValidateJwtSvidError) as refused:
            client.validate_jwt_svid(svid.token, "not-the-bank")
        # Refused by the Workload API itself, not only by the client library's local parsing.
        cause = refused.value.__cause__
        assert isinstance(cause, grpc.RpcError), refused.value
        assert cause.code() == grpc.StatusCode.INVALID_ARGUMENT, cause

        bundles = client.fetch_jwt_bundles()

    bundle = bundles.get_bundle_for_trust_domain(TD)
    assert bundle is not None, "no JWT bundle for the trust domain"
    kid = jwt.get_unverified_header(svid.token).get("kid")
    assert kid, "JWT-SVID has no kid header"
    assert bundle.get_jwt_authority(kid) is not None, f"kid {kid} not in the JWT bundle"
    # The bundle alone (no issuer round trip) verifies the token's signature and audience.
    assert str(JwtSvid.parse_and_validate(svid.token, bundle, {"bank"}).spiffe_id) == TELLER


# -- 6. restart -------------------------------------------------------------------------------


def test_restart_keeps_entries_identity_and_root(issuer: IssuerProcess) -> None:
    created = {issuer.create_entry(TELLER, OUR_UID), issuer.create_entry(LEDGER, OTHER_UID)}
    assert set(issuer.entry_ids()) == created
    before = x509_context(issuer)

    assert issuer.restart() == 0, f"issuer did not exit cleanly on SIGTERM; log:\n{issuer.log()}"

    assert set(issuer.entry_ids()) == created
    after = x509_context(issuer)
    assert str(after.default_svid.spiffe_id) == TELLER
    roots_before = {fingerprint(c) for c in authorities(before) if is_self_signed(c)}
    roots_after = {fingerprint(c) for c in authorities(after) if is_self_signed(c)}
    assert roots_before, "the bundle holds no root"
    assert roots_after == roots_before, "the root changed across a restart"
    assert {fingerprint(c) for c in authorities(after)} == {
        fingerprint(c) for c in authorities(before)
    }, "the trust bundle changed across a restart"
    verify_x509_svid(after.default_svid.cert_chain, authorities(before), trust_domain=TRUST_DOMAIN)


# -- 7. entry delete --------------------------------------------------------------------------


def test_deleted_entry_is_refused_and_unknown_delete_is_a_usage_error(
    issuer: IssuerProcess,
) -> None:
    entry_id = issuer.create_entry(TELLER, OUR_UID)
    assert raw_fetch_x509(issuer.workload_socket).code == grpc.StatusCode.OK

    channel = grpc.insecure_channel(issuer.socket_uri)
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        stream = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=[HEADER], timeout=RPC_TIMEOUT
        )
        assert next(stream).svids[0].spiffe_id == TELLER

        issuer.cli_ok("entry", "delete", entry_id)

        # The stream that was open when the entry went away ends with PERMISSION_DENIED too;
        # a rotation sent before the deletion may still arrive first (10 s SVIDs, a busy host).
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()

    assert entry_id not in issuer.entry_ids()
    assert_refused(
        raw_fetch_x509(issuer.workload_socket), grpc.StatusCode.PERMISSION_DENIED, issuer.log()
    )

    unknown = issuer.cli("entry", "delete", str(uuid.uuid4()))
    assert unknown.returncode == 2, unknown
    one_line(unknown.stderr)


# -- 8. per-workload socket -------------------------------------------------------------------


def test_socket_selector_gets_its_own_private_socket(issuer: IssuerProcess) -> None:
    entry_id = issuer.create_entry(GATEWAY, "ztbank:socket:gateway")
    agent = issuer.workload_socket_for("gateway")
    wait_until(
        agent.exists,
        timeout=10.0,
        message=lambda: f"{agent} did not appear; log:\n{issuer.log()}",
    )
    mode = stat.S_IMODE(agent.parent.stat().st_mode)
    assert mode == 0o700, f"{agent.parent} has mode {mode:o}, expected 700"
    socket_mode = stat.S_IMODE(agent.stat().st_mode)
    assert socket_mode == 0o600, f"{agent} has mode {socket_mode:o}, expected 600"

    context = x509_context(issuer, f"unix://{agent}")
    assert str(context.default_svid.spiffe_id) == GATEWAY
    verify_x509_svid(
        context.default_svid.cert_chain, authorities(context), trust_domain=TRUST_DOMAIN
    )

    assert_refused(
        raw_fetch_x509(issuer.workload_socket), grpc.StatusCode.PERMISSION_DENIED, issuer.log()
    )

    issuer.cli_ok("entry", "delete", entry_id)
    wait_until(
        lambda: not agent.exists(),
        timeout=10.0,
        message=lambda: f"{agent} still exists after its entry was deleted; log:\n{issuer.log()}",
    )


# -- 9. CLI input errors ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_issuer() -> Iterator[IssuerProcess]:
    """One issuer for the read-only CLI error cases (each of them must leave it unchanged)."""
    with IssuerFactory() as factory:
        yield factory()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(
            ["entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/a//b"],
            id="empty-path-segment",
        ),
        pytest.param(
            ["entry", "create", "--spiffe-id", "spiffe://other.example/svc/teller"],
            id="outside-trust-domain",
        ),
        pytest.param(
            ["entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}"],
            id="trust-domain-only",
        ),
        pytest.param(
            ["entry", "create", "--spiffe-id", TELLER, "--selector", "unix:uid:abc"],
            id="selector-bad-value",
        ),
        pytest.param(
            ["entry", "create", "--spiffe-id", TELLER, "--selector", "unix:uid"],
            id="selector-two-parts",
        ),
        pytest.param(
            ["entry", "create", "--spiffe-id", TELLER, "--selector", "k8s:ns:default"],
            id="selector-unknown-type",
        ),
        pytest.param(
            ["svid", "mint", "--spiffe-id", TELLER, "--ttl", "11m"],
            id="mint-ttl-above-10m",
        ),
        pytest.param(
            ["svid", "mint", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/a//b"],
            id="mint-invalid-id",
        ),
    ],
)
def test_cli_input_error_is_one_line_and_exit_2(
    shared_issuer: IssuerProcess, args: list[str]
) -> None:
    issuer = shared_issuer
    if args[0] == "entry" and "--selector" not in args:
        args = [*args, "--selector", OUR_UID]
    out = issuer.base_dir / f"mint-{uuid.uuid4().hex[:8]}"
    if args[0] == "svid":
        args = [*args, "--out", str(out)]

    result = issuer.cli(*args)

    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line.startswith("ztbank: "), line
    assert result.stdout == ""
    assert issuer.entry_ids() == [], "a refused command created an entry"
    assert not out.exists(), "a refused mint created its output directory"


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"ZTBANK_SVID_TTL": "11m"}, id="svid-ttl-above-10m"),
        pytest.param({"ZTBANK_SVID_TTL": "abc"}, id="svid-ttl-garbage"),
        pytest.param({"ZTBANK_SVID_TTL": "4s"}, id="svid-ttl-below-5s"),
        pytest.param({"ZTBANK_SVID_TTL": "10s", "ZTBANK_CA_TTL": "50s"}, id="ca-ttl-below-6x"),
    ],
)
def test_issuer_run_with_invalid_settings_exits_2(
    issuer_factory: IssuerFactory, env: dict[str, str]
) -> None:
    issuer = issuer_factory.prepare(**env)

    result = issuer.cli("issuer", "run", timeout=20.0)

    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line.startswith("ztbank: "), line
    assert not issuer.workload_socket.exists(), "the issuer opened its socket despite bad settings"


def test_cli_against_stopped_issuer_exits_1(issuer: IssuerProcess) -> None:
    assert issuer.stop() == 0, f"issuer did not exit cleanly on SIGTERM; log:\n{issuer.log()}"
    assert not issuer.admin_socket.exists(), "a cleanly stopped issuer left its admin socket"
    for args in (
        ("entry", "list"),
        ("entry", "create", "--spiffe-id", TELLER, "--selector", OUR_UID),
    ):
        result = issuer.cli(*args)
        assert result.returncode == 1, result
        one_line(result.stderr)

    # Killed without cleanup: the stale admin socket refuses connections.
    issuer.start()
    issuer.kill()
    assert issuer.admin_socket.exists()
    result = issuer.cli("entry", "list")
    assert result.returncode == 1, result
    one_line(result.stderr)


# -- 10. svid mint ----------------------------------------------------------------------------


def test_svid_mint_writes_verifiable_files(issuer: IssuerProcess) -> None:
    out = issuer.base_dir / "minted"
    before = datetime.now(UTC)
    issuer.cli_ok("svid", "mint", "--spiffe-id", LEDGER, "--out", str(out), "--ttl", "1m")
    after = datetime.now(UTC)

    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert len(chain) == 2, f"svid.pem holds {len(chain)} certificates, expected leaf + CA"
    leaf, intermediate = chain
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer == intermediate.subject
    assert not is_self_signed(intermediate), "the second certificate is a root, not the issuer CA"
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [LEDGER]

    key_file = out / "svid.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert spki(key) == spki(leaf)

    bundle = x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())
    root = x509.load_pem_x509_certificate((issuer.certs_dir / "root-ca.pem").read_bytes())
    assert fingerprint(root) in {fingerprint(c) for c in bundle}
    assert str(verify_x509_svid(chain, bundle, trust_domain=TRUST_DOMAIN)) == LEDGER
    # Against the root alone, too: the chain is complete up to the trust domain's root.
    assert str(verify_x509_svid(chain, [root], trust_domain=TRUST_DOMAIN)) == LEDGER

    # Exactly --ttl 1m, notBefore backdated 6s (a tenth of it).
    assert_validity(leaf, timedelta(minutes=1), issued_after=before, issued_before=after)


# -- 11. CA rotation --------------------------------------------------------------------------

ROTATION_SVID_TTL = 5.0
ROTATION_CA_TTL = 30.0
# The first CA is issued at start, backdated min(10s, 30s/10) = 3s, so it expires 27s later:
# the next CA is prepared ~13.5s and activated ~20.25s after the start.
ROTATION_CA_BACKDATE = 3.0
ROTATION_WINDOW = 31.0  # from the issuer's start: covers the first prepare and activate


@dataclass(frozen=True)
class Update:
    index: int
    at: float  # time.time() of arrival
    svid: X509Svid
    bundle: tuple[x509.Certificate, ...]
    verify_error: str | None

    @property
    def signing_ca(self) -> x509.Certificate:
        return self.svid.cert_chain[1]

    def describe(self, start: float) -> str:
        cas = ", ".join(
            f"{common_name(c)}#{c.serial_number % 0xFFFF:04x}"
            for c in self.bundle
            if not is_self_signed(c)
        )
        ca = self.signing_ca
        serial = self.svid.leaf.serial_number % 0xFFFF
        error = f"  VERIFY FAILED: {self.verify_error}" if self.verify_error else ""
        return (
            f"#{self.index} +{self.at - start:5.2f}s svid {serial:04x}"
            f" by {common_name(ca)}#{ca.serial_number % 0xFFFF:04x} | bundle CAs: {cas}{error}"
        )


@dataclass(frozen=True)
class RotationRun:
    started: float
    updates: tuple[Update, ...]
    log: str

    def timeline(self) -> str:
        return "\n".join(u.describe(self.started) for u in self.updates)

    def first_bundle_with(self, ca: x509.Certificate) -> Update | None:
        wanted = fingerprint(ca)
        return next((u for u in self.updates if wanted in map(fingerprint, u.bundle)), None)

    def new_signing_cas(self) -> list[x509.Certificate]:
        """Signing CAs of received SVIDs that were not in the first update's bundle."""
        initial = {fingerprint(c) for c in self.updates[0].bundle}
        result: dict[bytes, x509.Certificate] = {}
        for update in self.updates:
            ca = update.signing_ca
            if fingerprint(ca) not in initial:
                result.setdefault(fingerprint(ca), ca)
        return list(result.values())


def _verify_error(svid: X509Svid, bundle: Sequence[x509.Certificate]) -> str | None:
    try:
        verify_x509_svid(svid.cert_chain, bundle, trust_domain=TRUST_DOMAIN)
    except SvidVerificationError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def ca_rotation() -> Iterator[RotationRun]:
    """Watch one workload's X509 context stream for ~30s with SVID TTL 5s and CA TTL 30s.

    Each update is verified on arrival (later, its short-lived SVID would have expired).
    """
    with IssuerFactory() as factory:
        issuer = factory(
            ZTBANK_SVID_TTL=f"{ROTATION_SVID_TTL:.0f}s", ZTBANK_CA_TTL=f"{ROTATION_CA_TTL:.0f}s"
        )
        assert issuer.ready_at is not None
        issuer.create_entry(TELLER, OUR_UID)
        updates: list[Update] = []
        lock = threading.Lock()

        def record(context: X509Context) -> None:
            now = time.time()
            svid = context.default_svid
            bundle = tuple(authorities(context))
            with lock:
                if updates and (
                    updates[-1].svid.leaf.serial_number == svid.leaf.serial_number
                    and updates[-1].bundle == bundle
                ):
                    return
                updates.append(Update(len(updates), now, svid, bundle, _verify_error(svid, bundle)))

        with X509Source(socket_path=issuer.socket_uri, timeout_in_seconds=SOURCE_TIMEOUT) as source:
            source.subscribe_for_updates(lambda: record(source.get_x509_context()))
            record(source.get_x509_context())
            deadline = issuer.ready_at + ROTATION_WINDOW
            while time.time() < deadline and not source.is_closed():
                time.sleep(0.2)
            assert not source.is_closed(), f"the X509 stream failed; log:\n{issuer.log()}"
        with lock:
            observed = tuple(updates)
        yield RotationRun(issuer.ready_at, observed, issuer.log())


def test_ca_rotation_publishes_new_ca_before_it_signs(ca_rotation: RotationRun) -> None:
    run = ca_rotation
    context = f"timeline:\n{run.timeline()}\nissuer log:\n{run.log}"
    assert len(run.updates) >= 5, f"too few updates to judge a rotation\n{context}"

    failed = [u for u in run.updates if u.verify_error]
    assert not failed, f"SVIDs that fail verification against their own update's bundle\n{context}"

    initial = {fingerprint(c) for c in run.updates[0].bundle}
    grown = [u for u in run.updates if {fingerprint(c) for c in u.bundle} - initial]
    assert grown, f"the bundle never gained a new signing CA\n{context}"
    assert run.new_signing_cas(), f"no SVID was signed by a CA introduced later\n{context}"

    published: set[bytes] = set()
    for update in run.updates:
        if update.index > 0:
            assert fingerprint(update.signing_ca) in published, (
                f"update #{update.index} carries an SVID from {common_name(update.signing_ca)}"
                f" which no earlier update's bundle contained\n{context}"
            )
        published.update(fingerprint(c) for c in update.bundle)


def test_ca_rotation_publishes_new_ca_a_quarter_ttl_before_it_signs(
    ca_rotation: RotationRun,
) -> None:
    """Prepared at 50% and activated at 75% of the active CA's life, counted from when it was
    issued (not from its backdated notBefore) to its notAfter: every workload holds a new CA in
    its bundle for 25% of that (0.25 * (30s - 3s) = 6.75s here) before any SVID it signed
    arrives.  The first such SVID comes with the next SVID rotation after the activation, at
    most half an SVID TTL later."""
    run = ca_rotation
    context = f"timeline:\n{run.timeline()}\nissuer log:\n{run.log}"
    new_cas = run.new_signing_cas()
    assert new_cas, f"no SVID was signed by a CA introduced later\n{context}"
    expected_lead = 0.25 * (ROTATION_CA_TTL - ROTATION_CA_BACKDATE)
    latest_lead = expected_lead + 0.5 * ROTATION_SVID_TTL
    for ca in new_cas:
        published = run.first_bundle_with(ca)
        first_svid = next(u for u in run.updates if fingerprint(u.signing_ca) == fingerprint(ca))
        assert published is not None
        lead = first_svid.at - published.at
        assert expected_lead - 1.0 <= lead <= latest_lead + 1.0, (
            f"{common_name(ca)} was published {lead:.2f}s before its first SVID arrived;"
            f" expected {expected_lead:.2f}s to {latest_lead:.2f}s\n{context}"
        )
