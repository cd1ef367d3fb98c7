"""What the policy and upstream labs change on the stack, and how they put it back."""

import json
from pathlib import Path

import pytest

from services.common.authz.policy import Policy
from services.common.identity.spiffe_id import SpiffeId
from services.labs.errors import LabError
from services.labs.policy import KEPT, ROUTE, withdraw_route
from services.labs.upstream import RootKey, chains_to
from tests.support.pki import create_intermediate_ca, create_root_ca

TD = "ztbank.example"
TELLER = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/teller"
GATEWAY = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/gateway"
# infra/policy.json as the native stack shipped it when the lab was written.
POLICY = json.dumps(
    {
        "rules": [
            {"service": "gateway", "methods": ["* /v1/*"], "callers": [TELLER]},
            {
                "service": "transfer-engine",
                "methods": ["/ztbank.ledger.v1.TransferEngine/*"],
                "callers": [GATEWAY.replace(TD, "{trust_domain}")],
            },
        ]
    }
)


def decide(policy_text: str, tmp_path: Path, service: str, method: str, caller: str) -> bool:
    path = tmp_path / "policy.json"
    path.write_text(policy_text)
    return Policy(path, TD).decide(service, method, SpiffeId.parse(caller)).allowed


def test_the_edit_denies_the_route_and_keeps_tokens_and_every_other_rule(tmp_path: Path) -> None:
    original = POLICY
    edited, lost = withdraw_route(original, TD, TELLER)

    assert lost == ["* /v1/*"]
    assert decide(original, tmp_path, "gateway", ROUTE, TELLER)
    assert not decide(edited, tmp_path, "gateway", ROUTE, TELLER)
    assert decide(edited, tmp_path, "gateway", KEPT, TELLER)
    assert not decide(edited, tmp_path, "gateway", "POST /v1/transfers", TELLER)
    # The rest of the bank is untouched: the gateway still calls the transfer-engine.
    method = "/ztbank.ledger.v1.TransferEngine/ListAccounts"
    assert decide(edited, tmp_path, "transfer-engine", method, GATEWAY)
    untouched = [r for r in json.loads(original)["rules"] if r["service"] != "gateway"]
    assert all(rule in json.loads(edited)["rules"] for rule in untouched)


def test_only_the_patterns_matching_the_route_are_withdrawn_and_only_from_the_teller(
    tmp_path: Path,
) -> None:
    other = f"spiffe://{TD}/env/prod/zone/az1/team/x/svc/console"
    policy = {
        "rules": [
            {
                "service": "gateway",
                "methods": ["* /v1/*", "GET /openapi.json"],
                "callers": [TELLER, other],
            },
            {"service": "gateway", "methods": ["GET /docs"], "callers": [TELLER]},
        ]
    }
    edited, lost = withdraw_route(json.dumps(policy), TD, TELLER)

    assert lost == ["* /v1/*"]
    assert not decide(edited, tmp_path, "gateway", ROUTE, TELLER)
    for method in ("GET /openapi.json", "GET /docs", KEPT):
        assert decide(edited, tmp_path, "gateway", method, TELLER), method
    assert decide(edited, tmp_path, "gateway", ROUTE, other)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("not json", "not a policy document"),
        ('{"rules": [{"service": "risk", "methods": ["*"], "callers": []}]}', "nothing to deny"),
    ],
)
def test_a_policy_the_lab_cannot_edit_is_refused(text: str, mentions: str) -> None:
    with pytest.raises(LabError, match=mentions):
        withdraw_route(text, TD, TELLER)


def test_a_new_ca_chains_to_the_pinned_root_only_through_valid_signatures() -> None:
    root = create_root_ca(common_name="pinned root")
    middle = create_intermediate_ca(root, common_name="pki_int", path_length=1)
    issuer_ca = create_intermediate_ca(middle, common_name="issuer CA")
    impostor_root = create_root_ca(common_name="pinned root")  # same name, another key
    forged_middle = create_intermediate_ca(impostor_root, common_name="pki_int", path_length=1)
    forged = create_intermediate_ca(forged_middle, common_name="issuer CA")
    pool = [root.certificate, middle.certificate, issuer_ca.certificate]

    assert chains_to(issuer_ca.certificate, pool, root.certificate)
    assert chains_to(middle.certificate, pool, root.certificate)
    # Names match all the way up, signatures do not.
    assert not chains_to(forged.certificate, [*pool, forged_middle.certificate], root.certificate)
    # No path to the root in the pool.
    assert not chains_to(issuer_ca.certificate, [issuer_ca.certificate], root.certificate)


def test_the_root_key_goes_aside_and_back_unchanged(tmp_path: Path) -> None:
    key = RootKey(tmp_path / "root-ca.key")
    key.path.write_bytes(b"secret")
    key.path.chmod(0o600)

    key.take_offline()
    assert not key.path.exists()
    assert key.left_offline()  # as the next run finds it after a kill: put back
    assert key.path.read_bytes() == b"secret"
    assert key.path.stat().st_mode & 0o777 == 0o600
    assert not key.left_offline()


def test_putting_back_a_key_that_never_went_aside_changes_nothing(tmp_path: Path) -> None:
    """The lab undoes a fault also when an interrupt landed before it was made."""
    key = RootKey(tmp_path / "root-ca.key")
    key.path.write_bytes(b"secret")

    assert key.put_back() == f"the root key stayed at {key.path}"
    assert key.path.read_bytes() == b"secret"
    assert not key.aside.exists()


def test_a_key_both_aside_and_in_place_is_left_to_the_operator(tmp_path: Path) -> None:
    key = RootKey(tmp_path / "root-ca.key")
    key.path.write_bytes(b"one")
    key.aside.write_bytes(b"two")

    with pytest.raises(LabError, match="keep the right one"):
        key.left_offline()
    assert key.path.read_bytes() == b"one"
    assert key.aside.read_bytes() == b"two"


def test_a_missing_root_key_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    key = RootKey(tmp_path / "root-ca.key")

    with pytest.raises(LabError, match="cannot take the root key offline"):
        key.take_offline()
    assert not key.aside.exists()
