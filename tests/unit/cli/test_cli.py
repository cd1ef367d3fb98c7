import json
import stat
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from services.cli import main as cli
from services.common.identity.spiffe_id import DEFAULT_TRUST_DOMAIN
from services.issuer.admin_client import call_admin
from tests.support.helpers import scrub_environment

LEDGER = f"spiffe://{DEFAULT_TRUST_DOMAIN}/env/dev/zone/az1/team/payments/svc/ledger"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty ZTBANK_HOME (no issuer running) and nothing else from the caller's env."""
    scrub_environment(monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ZTBANK_HOME", str(home))
    monkeypatch.setenv("ZTBANK_CERTS_DIR", str(tmp_path / "certs"))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def admin_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records any attempt to reach the issuer (and fails it as if none were running)."""
    calls: list[Path] = []

    def spy(socket_path: Path, call: object) -> object:
        calls.append(socket_path)
        return call_admin(socket_path, call)  # type: ignore[arg-type]

    monkeypatch.setattr("services.cli.commands.identity.call_admin", spy)
    return calls


def single_line(text: str) -> str:
    assert text.endswith("\n")
    assert text.count("\n") == 1, text
    return text


def run(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else -1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- usage errors from the parser -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["frobnicate"], "invalid choice"),
        (["entry", "frobnicate"], "invalid choice"),
        ([], "required"),
        (["entry"], "required"),
        (["entry", "create", "--selector", "unix:uid:1000"], "--spiffe-id"),
        (["entry", "create", "--spiffe-id", LEDGER], "--selector"),
        (["svid", "mint", "--spiffe-id", LEDGER], "--out"),
        (["entry", "delete"], "entry_id"),
        (["entry", "list", "--bogus"], "unrecognized arguments"),
        (["issuer", "run", "--upstream", "cloud"], "invalid choice"),
        (["revoke"], "one of the arguments --serial --spiffe-id is required"),
        (["revoke", "--serial", "ab", "--spiffe-id", LEDGER], "not allowed with"),
        (["revoke", "--reason", "keyCompromise"], "required"),
        (["lab", "frobnicate"], "invalid choice"),
        (["lab", "revocation", "--budget", "soon"], "invalid float value"),
        (["lab", "revocation", "--budget", "0"], "--budget must be a positive number"),
        (["lab", "mis-issued", "--budget", "1"], "unrecognized arguments"),
        (["lab", "rotation", "--rotations", "0"], "--rotations must be between 1 and 5"),
        (["lab", "rotation", "--rotations", "two"], "invalid int value"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str], admin_calls: list[Path]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert mentions in single_line(err)
    assert admin_calls == []


def test_lab_without_a_name_lists_every_lab(
    capsys: pytest.CaptureFixture[str], admin_calls: list[Path]
) -> None:
    code, out, err = run(["lab"], capsys)

    assert (code, err, admin_calls) == (0, "", [])
    assert "`ztbank lab NAME` or `make lab-NAME`" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    names = [
        "revocation",
        "mis-issued",
        "rotation",
        "outage",
        "policy",
        "expiry",
        "upstream",
        "breaker",
    ]
    assert listed == names
    assert "  policy      deny a route by a live policy edit" in out  # its --help line


def test_a_lab_without_a_stack_says_how_to_start_one(
    capsys: pytest.CaptureFixture[str], environment: Path
) -> None:
    # Bad input (issue 21): one line on stderr, exit 2, before the lab says or changes anything.
    for lab in ("policy", "expiry", "upstream", "breaker"):
        code, out, err = run(["lab", lab], capsys)

        assert (code, out) == (2, "")
        assert single_line(err) == (
            f"ztbank: no stack runs in ZTBANK_HOME={environment}: start it with `make up` in the"
            " checkout, or set ZTBANK_HOME to the home of a running stack\n"
        )
        assert list(environment.iterdir()) == []  # not even the lab lock's run directory


# -- input validation before any connection -------------------------------------------------


def entry_create(
    *extra: str, spiffe_id: str = LEDGER, selector: str = "unix:uid:1000"
) -> list[str]:
    return ["entry", "create", "--spiffe-id", spiffe_id, "--selector", selector, *extra]


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (entry_create(spiffe_id="ledger"), "spiffe://"),
        (entry_create(spiffe_id=f"spiffe://{DEFAULT_TRUST_DOMAIN}/svc//x"), "empty segment"),
        (entry_create(spiffe_id="spiffe://other.example/svc/ledger"), "outside the trust domain"),
        (entry_create(spiffe_id=f"spiffe://{DEFAULT_TRUST_DOMAIN}"), "trust domain itself"),
        (entry_create(selector="unix:uid"), "TYPE:KEY:VALUE"),
        (entry_create(selector="unix:uid:root"), "numeric uid"),
        (entry_create(selector="docker:label:x"), "unknown selector"),
        (entry_create(selector="unix:path:bin/ledger"), "absolute"),
        (entry_create("--selector", "ztbank:socket:Bad Name"), "socket name"),
        (entry_create("--ttl", "soon"), "invalid duration"),
        (entry_create("--ttl", "30"), "invalid duration"),
        (entry_create("--ttl", "500ms"), "at least 1s"),
        (["--trust-domain", "Bank.Example", *entry_create()], "trust domain"),
        (["svid", "mint", "--spiffe-id", "spiffe://other.example/x", "--out", "o"], "outside"),
        (["svid", "mint", "--spiffe-id", LEDGER, "--out", "o", "--ttl", "1 minute"], "duration"),
        (["revoke", "--serial", "xyz"], "not a certificate serial"),
        (["revoke", "--serial", "0"], "not a certificate serial"),
        (["revoke", "--serial", "ab", "--reason", "stolen"], "unknown revocation reason"),
        (["revoke", "--serial", "ab", "--reason", "cACompromise"], "keyCompromise"),
        (["revoke", "--spiffe-id", "spiffe://other.example/x"], "outside the trust domain"),
        (["revoke", "--spiffe-id", f"spiffe://{DEFAULT_TRUST_DOMAIN}"], "trust domain itself"),
        (["revoke", "--serial", "ab", "--undo"], "a serial stays revoked"),
        (["revoke", "--spiffe-id", LEDGER, "--undo", "--reason", "superseded"], "no --reason"),
        (["revoke", "--spiffe-id", "ledger", "--undo"], "spiffe://"),
    ],
)
def test_invalid_input_is_refused_before_contacting_the_issuer(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str], admin_calls: list[Path]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert mentions in single_line(err)
    assert err.startswith("ztbank: ")
    assert admin_calls == []


def test_other_trust_domain_flag_moves_the_boundary(
    capsys: pytest.CaptureFixture[str], admin_calls: list[Path]
) -> None:
    code, _, err = run(["--trust-domain", "other.example", *entry_create()], capsys)
    assert code == 2
    assert "outside the trust domain other.example" in single_line(err)
    assert admin_calls == []


# -- issuer not running ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        entry_create("--ttl", "30s", "--dns-name", "ledger"),
        ["entry", "list"],
        ["entry", "delete", "0b6f2c1e"],
        ["svid", "mint", "--spiffe-id", LEDGER, "--out", "minted"],
        ["revoke", "--serial", "0x4F:0C", "--reason", "keycompromise"],
        ["revoke", "--spiffe-id", LEDGER],
        ["revoke", "--spiffe-id", LEDGER, "--undo"],
    ],
)
def test_valid_input_without_an_issuer_is_exit_1(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    admin_calls: list[Path],
    environment: Path,
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 1
    assert out == ""
    assert "issuer is not running" in single_line(err)
    assert str(environment / "run" / "issuer" / "admin.sock") in err
    assert admin_calls == [environment / "run" / "issuer" / "admin.sock"]
    assert not (Path("minted") / "svid.key").exists()


# -- certs init -----------------------------------------------------------------------------


def test_certs_init_creates_then_keeps_the_root(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    code, out, err = run(["certs", "init"], capsys)
    assert (code, err) == (0, "")
    assert single_line(out).startswith(f"created root CA for {DEFAULT_TRUST_DOMAIN}")
    key, cert = certs / "root-ca.key", certs / "root-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate(cert.read_bytes())
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{DEFAULT_TRUST_DOMAIN}"
    ]
    before = (key.read_bytes(), cert.read_bytes())

    code, out, err = run(["certs", "init"], capsys)
    assert (code, err) == (0, "")
    assert single_line(out).startswith("kept existing root CA")
    assert (key.read_bytes(), cert.read_bytes()) == before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certs_init_with_half_a_root_is_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run(["certs", "init"], capsys)
    (tmp_path / "certs" / "root-ca.pem").unlink()
    code, out, err = run(["certs", "init"], capsys)
    assert code == 1
    assert out == ""
    assert "only one of" in single_line(err)


def test_certs_init_for_another_trust_domain(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(["--trust-domain", "bank.test", "certs", "init"], capsys)
    assert code == 0
    assert "bank.test" in out
    root = x509.load_pem_x509_certificate((tmp_path / "certs" / "root-ca.pem").read_bytes())
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://bank.test"]


# -- status -----------------------------------------------------------------------------------


def _issuer_status(**fields: Any) -> dict[str, Any]:
    """The "issuer" part of ``ztbank status --json`` for a stack without services."""
    from services.stack.native import StackStatus, status_document

    status = StackStatus(
        trust_domain=DEFAULT_TRUST_DOMAIN,
        root_ca="certs/root-ca.pem",
        issuer_socket="unix:///var/run/workload.sock",
        issuer_running=True,
        services={},
        **fields,
    )
    issuer: dict[str, Any] = json.loads(json.dumps(status_document(status)))["issuer"]
    return issuer


def test_status_document_names_the_revocation_endpoints() -> None:
    issuer = _issuer_status(
        issuer_crl_url="http://127.0.0.1:8180/crls", issuer_ocsp_url="http://127.0.0.1:8180/ocsp"
    )
    assert issuer == {
        "socket": "unix:///var/run/workload.sock",
        "running": True,
        "crl_url": "http://127.0.0.1:8180/crls",
        "ocsp_url": "http://127.0.0.1:8180/ocsp",
        "authority": None,  # the admin socket did not answer
    }


def test_status_document_carries_the_issuer_authority() -> None:
    from services.stack.native import IssuerAuthority

    authority = IssuerAuthority(
        upstream="disk",
        active_ca_serial="1f2e",
        active_ca_not_after="2026-11-29T10:00:00+00:00",
        entries=5,
        crl_number=7,
        revoked_certificates=2,
        revoked_spiffe_ids=("spiffe://ztbank.example/env/prod/zone/az1/team/x/svc/y",),
        ca_chain=(
            {"subject": "CN=ztbank issuer CA 1", "serial": "1f2e", "not_after": "2026-11-29"},
            {"subject": "CN=ztbank root CA", "serial": "0a", "not_after": "2036-11-29"},
        ),
        upstream_error="no root CA in /srv/certs: run `ztbank certs init` (or `make certs`)",
        upstream_last_success="2026-11-28T10:00:00+00:00",
    )
    assert _issuer_status(issuer_authority=authority)["authority"] == {
        "upstream": "disk",
        "active_ca_serial": "1f2e",
        "active_ca_not_after": "2026-11-29T10:00:00+00:00",
        "entries": 5,
        "crl_number": 7,
        "revoked_certificates": 2,
        "revoked_spiffe_ids": ["spiffe://ztbank.example/env/prod/zone/az1/team/x/svc/y"],
        "ca_chain": [
            {"subject": "CN=ztbank issuer CA 1", "serial": "1f2e", "not_after": "2026-11-29"},
            {"subject": "CN=ztbank root CA", "serial": "0a", "not_after": "2036-11-29"},
        ],
        "upstream_error": "no root CA in /srv/certs: run `ztbank certs init` (or `make certs`)",
        "upstream_last_success": "2026-11-28T10:00:00+00:00",
    }


def test_native_stack_passes_and_reports_the_issuer_http_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.stack.native import NativeStack, StackSettings
    from services.stack.sandbox import REPO_ROOT

    monkeypatch.setenv("ZTBANK_ISSUER_HTTP", "127.0.0.1:9999")
    stack = NativeStack(StackSettings(registry=REPO_ROOT / "infra" / "registry.json"))
    assert stack.env["ZTBANK_ISSUER_HTTP"] == "127.0.0.1:9999"
    monkeypatch.setattr(stack, "_ops_svid", lambda: None)
    status = stack.status()
    assert status.issuer_crl_url == "http://127.0.0.1:9999/crls"
    assert status.issuer_ocsp_url == "http://127.0.0.1:9999/ocsp"


# -- health ---------------------------------------------------------------------------------


def test_health_of_a_service_that_does_not_run_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], environment: Path
) -> None:
    code, out, err = run(["health", "risk"], capsys)
    assert (code, out) == (1, "")
    socket = environment / "run" / "risk" / "health.sock"
    assert single_line(err).startswith(f"ztbank: risk: no answer on {socket}: ")
    assert err.endswith(": is it running?\n")


def test_health_reads_the_services_own_word(
    capsys: pytest.CaptureFixture[str], environment: Path
) -> None:
    from services.common.runtime.health import HealthSocket, ServiceHealth, health_socket

    health = ServiceHealth("risk")
    reasons = ["failing closed: no fresh CRL of CN=signing CA", "audit log not writable: x"]
    for reason in reasons:
        health.require(reason, partial(str, reason))
    served = HealthSocket(health_socket(environment, "risk"), health)
    try:
        assert run(["health", "risk"], capsys) == (
            1,
            f"risk: not ready\n  {reasons[0]}\n  {reasons[1]}\n",
            "",
        )
        assert run(["health", "risk", "--live"], capsys) == (0, "risk: live\n", "")
    finally:
        served.close()


def test_health_knows_only_the_bank_services(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["health", "issuer"], capsys)
    assert code == 2
    assert "invalid choice: 'issuer'" in err
