from datetime import timedelta
from pathlib import Path

import pytest

from services.common.settings import InvalidSettingsError, load_settings
from services.issuer.settings import IssuerSettings

ENDPOINT_VARIABLES = ("SPIFFE_ENDPOINT_SOCKET", "ZTBANK_ENDPOINT_SOCKET")


pytestmark = pytest.mark.usefixtures("settings_environment")


def refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidSettingsError) as caught:
        load_settings(IssuerSettings)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("invalid setting")
    return message


# -- defaults -------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(IssuerSettings)
    assert settings.trust_domain == "ztbank.example"
    assert settings.svid_ttl == timedelta(minutes=5)
    assert settings.jwt_svid_ttl == timedelta(minutes=5)
    assert settings.ca_ttl == timedelta(hours=24)
    assert settings.upstream == "disk"
    assert settings.home == tmp_path / "var"
    assert settings.certs_dir == tmp_path / "certs"
    assert settings.home.is_absolute()
    assert settings.certs_dir.is_absolute()
    assert settings.endpoint_socket == f"unix://{tmp_path}/var/run/workload.sock"
    assert settings.workload_socket == tmp_path / "var" / "run" / "workload.sock"
    assert settings.state_dir == tmp_path / "var" / "issuer"
    assert settings.admin_socket == tmp_path / "var" / "run" / "issuer" / "admin.sock"
    assert settings.crl_ttl == settings.crl_validity == settings.svid_ttl
    assert settings.issuer_http == "127.0.0.1:8180"
    assert settings.issuer_url == "http://127.0.0.1:8180"


def test_endpoint_socket_follows_ztbank_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / "bank"))
    settings = load_settings(IssuerSettings)
    assert settings.workload_socket == tmp_path / "bank" / "run" / "workload.sock"
    assert settings.endpoint_socket == f"unix://{tmp_path}/bank/run/workload.sock"


def test_relative_paths_become_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZTBANK_HOME", "state/home")
    monkeypatch.setenv("ZTBANK_CERTS_DIR", "pki")
    settings = load_settings(IssuerSettings)
    assert settings.home == tmp_path / "state" / "home"
    assert settings.certs_dir == tmp_path / "pki"
    assert settings.workload_socket == tmp_path / "state" / "home" / "run" / "workload.sock"


@pytest.mark.parametrize("variable", ENDPOINT_VARIABLES)
@pytest.mark.parametrize("form", ["unix://{}", "{}"])
def test_explicit_endpoint_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, form: str
) -> None:
    path = tmp_path / "agent.sock"
    monkeypatch.setenv(variable, form.format(path))
    assert load_settings(IssuerSettings).workload_socket == path


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("ZTBANK_SVID_TTL", "20s", "svid_ttl", timedelta(seconds=20)),
        ("ZTBANK_SVID_TTL", "5m", "svid_ttl", timedelta(minutes=5)),
        ("ZTBANK_SVID_TTL", "10m", "svid_ttl", timedelta(minutes=10)),
        ("ZTBANK_SVID_TTL", "5s", "svid_ttl", timedelta(seconds=5)),
        ("ZTBANK_JWT_SVID_TTL", "20s", "jwt_svid_ttl", timedelta(seconds=20)),
        ("ZTBANK_CA_TTL", "2h", "ca_ttl", timedelta(hours=2)),
        ("ZTBANK_TRUST_DOMAIN", "bank.test", "trust_domain", "bank.test"),
        ("ZTBANK_UPSTREAM", "disk", "upstream", "disk"),
        ("ZTBANK_CRL_TTL", "30s", "crl_validity", timedelta(seconds=30)),
        ("ZTBANK_CRL_TTL", "5s", "crl_validity", timedelta(seconds=5)),
        ("ZTBANK_CRL_TTL", "5m", "crl_validity", timedelta(minutes=5)),
        ("ZTBANK_CRL_TTL", "", "crl_validity", timedelta(minutes=5)),
        ("ZTBANK_ISSUER_PUBLIC_URL", "http://issuer:8180/", "issuer_url", "http://issuer:8180"),
        (
            "ZTBANK_ISSUER_PUBLIC_URL",
            "https://pki.example/z",
            "issuer_url",
            "https://pki.example/z",
        ),
        ("ZTBANK_ISSUER_HTTP", "[::1]:9000", "issuer_url", "http://[::1]:9000"),
        ("ZTBANK_ISSUER_HTTP", "issuer.internal:80", "issuer_url", "http://issuer.internal:80"),
    ],
)
def test_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(IssuerSettings), field) == expected


VAULT = {
    "ZTBANK_UPSTREAM": "vault",
    "VAULT_ADDR": "https://vault.internal:8200",
    "ZTBANK_VAULT_ROOT_CA": "vault-root.pem",
}


def _vault_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> IssuerSettings:
    for name, value in {**VAULT, **env}.items():
        monkeypatch.setenv(name, value)
    return load_settings(IssuerSettings)


def test_vault_upstream_with_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _vault_settings(monkeypatch, VAULT_TOKEN="token")
    assert settings.upstream == "vault"
    assert settings.vault_addr == "https://vault.internal:8200"
    assert settings.vault_token == "token"
    # Relative to where the issuer starts, as ZTBANK_HOME is.
    assert settings.vault_root_ca == tmp_path / "vault-root.pem"


def test_vault_upstream_with_approle(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _vault_settings(
        monkeypatch, ZTBANK_VAULT_ROLE_ID="role", ZTBANK_VAULT_SECRET_ID="secret"
    )
    assert (settings.vault_role_id, settings.vault_secret_id) == ("role", "secret")
    assert settings.vault_approle_file is None


def test_vault_upstream_with_an_approle_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _vault_settings(monkeypatch, ZTBANK_VAULT_APPROLE_FILE="bootstrap/approle.json")
    assert settings.vault_approle_file == tmp_path / "bootstrap" / "approle.json"
    assert settings.vault_role_id is settings.vault_secret_id is None


def test_vault_files_are_unset_by_default_and_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(IssuerSettings).vault_root_ca is None
    monkeypatch.setenv("ZTBANK_VAULT_APPROLE_FILE", "")
    monkeypatch.setenv("ZTBANK_VAULT_ROOT_CA", "")
    settings = load_settings(IssuerSettings)
    assert (settings.vault_approle_file, settings.vault_root_ca) == (None, None)


def test_settings_repr_hides_vault_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    text = repr(
        _vault_settings(
            monkeypatch,
            VAULT_TOKEN="hvs.token-do-not-leak",
            ZTBANK_VAULT_ROLE_ID="role",
            ZTBANK_VAULT_SECRET_ID="secret-id-do-not-leak",
        )
    )
    assert "vault_role_id='role'" in text
    assert "do-not-leak" not in text


def test_ca_ttl_of_exactly_six_svid_ttls_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTBANK_SVID_TTL", "10m")
    monkeypatch.setenv("ZTBANK_CA_TTL", "1h")
    assert load_settings(IssuerSettings).ca_ttl == timedelta(hours=1)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ZTBANK_SVID_TTL": "11m"}, "ZTBANK_SVID_TTL"),
        ({"ZTBANK_SVID_TTL": "601s"}, "ZTBANK_SVID_TTL"),
        ({"ZTBANK_SVID_TTL": "4s"}, "ZTBANK_SVID_TTL"),
        ({"ZTBANK_SVID_TTL": "500ms"}, "ZTBANK_SVID_TTL"),
        ({"ZTBANK_JWT_SVID_TTL": "1h"}, "ZTBANK_JWT_SVID_TTL"),
        ({"ZTBANK_JWT_SVID_TTL": "1s"}, "ZTBANK_JWT_SVID_TTL"),
        ({"ZTBANK_SVID_TTL": "soon"}, "ZTBANK_SVID_TTL"),
        ({"ZTBANK_SVID_TTL": "300"}, "ZTBANK_SVID_TTL"),
        ({"ZTBANK_CA_TTL": "a day"}, "ZTBANK_CA_TTL"),
        ({"ZTBANK_TRUST_DOMAIN": "ZTBank.example"}, "ZTBANK_TRUST_DOMAIN"),
        ({"ZTBANK_TRUST_DOMAIN": "bank example"}, "ZTBANK_TRUST_DOMAIN"),
        ({"ZTBANK_SVID_TTL": "10m", "ZTBANK_CA_TTL": "59m"}, "ZTBANK_CA_TTL"),
        ({"ZTBANK_CA_TTL": "20m"}, "ZTBANK_CA_TTL"),
        ({"ZTBANK_UPSTREAM": "cloud"}, "ZTBANK_UPSTREAM"),
        ({"ZTBANK_CRL_TTL": "4s"}, "ZTBANK_CRL_TTL"),
        ({"ZTBANK_CRL_TTL": "6m"}, "ZTBANK_CRL_TTL"),
        ({"ZTBANK_SVID_TTL": "20s", "ZTBANK_CRL_TTL": "21s"}, "ZTBANK_CRL_TTL"),
        ({"ZTBANK_CRL_TTL": "often"}, "ZTBANK_CRL_TTL"),
        ({"ZTBANK_ISSUER_HTTP": "127.0.0.1"}, "ZTBANK_ISSUER_HTTP"),
        ({"ZTBANK_ISSUER_HTTP": "127.0.0.1:0"}, "ZTBANK_ISSUER_HTTP"),
        ({"ZTBANK_ISSUER_HTTP": "127.0.0.1:70000"}, "ZTBANK_ISSUER_HTTP"),
        ({"ZTBANK_ISSUER_HTTP": ":8180"}, "ZTBANK_ISSUER_HTTP"),
        ({"ZTBANK_ISSUER_HTTP": "http://127.0.0.1:8180"}, "ZTBANK_ISSUER_HTTP"),
        ({"ZTBANK_ISSUER_HTTP": "127.0.0.1:8180/x"}, "ZTBANK_ISSUER_HTTP"),
        ({"ZTBANK_ISSUER_HTTP": "0.0.0.0:8180"}, "ZTBANK_ISSUER_PUBLIC_URL"),
        ({"ZTBANK_ISSUER_HTTP": "[::]:8180"}, "ZTBANK_ISSUER_PUBLIC_URL"),
        ({"ZTBANK_ISSUER_PUBLIC_URL": "issuer:8180"}, "ZTBANK_ISSUER_PUBLIC_URL"),
        ({"ZTBANK_ISSUER_PUBLIC_URL": "ftp://issuer"}, "ZTBANK_ISSUER_PUBLIC_URL"),
        ({"ZTBANK_UPSTREAM": "vault", "VAULT_TOKEN": "t"}, "VAULT_ADDR"),
        (
            {"ZTBANK_UPSTREAM": "vault", "VAULT_ADDR": "https://vault:8200", "VAULT_TOKEN": "t"},
            "ZTBANK_VAULT_ROOT_CA",
        ),
        (
            {
                "ZTBANK_UPSTREAM": "vault",
                "VAULT_ADDR": "https://vault:8200",
                "VAULT_TOKEN": "t",
                "ZTBANK_VAULT_ROOT_CA": "",
            },
            "ZTBANK_VAULT_ROOT_CA",
        ),
        (
            {"ZTBANK_UPSTREAM": "vault", "VAULT_ADDR": "https://vault:8200"},
            "ZTBANK_VAULT_APPROLE_FILE",
        ),
        (
            {
                "ZTBANK_UPSTREAM": "vault",
                "VAULT_ADDR": "https://vault:8200",
                "ZTBANK_VAULT_SECRET_ID": "secret",
            },
            "ZTBANK_VAULT_ROLE_ID",
        ),
        (
            {
                "ZTBANK_UPSTREAM": "vault",
                "VAULT_ADDR": "https://vault:8200",
                "ZTBANK_VAULT_APPROLE_FILE": "approle.json",
                "ZTBANK_VAULT_ROLE_ID": "role",
                "ZTBANK_VAULT_SECRET_ID": "secret",
            },
            "ZTBANK_VAULT_APPROLE_FILE",
        ),
        ({"ZTBANK_UPSTREAM": "vault", "VAULT_ADDR": "https://vault:8200"}, "ZTBANK_VAULT_ROLE_ID"),
        (
            {
                "ZTBANK_UPSTREAM": "vault",
                "VAULT_ADDR": "https://vault:8200",
                "ZTBANK_VAULT_ROLE_ID": "role",
            },
            "ZTBANK_VAULT_SECRET_ID",
        ),
    ],
)
def test_refusal_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    assert named in refusal(monkeypatch, **env)


def test_vault_needs_a_pinned_root_whatever_the_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(
        monkeypatch,
        ZTBANK_UPSTREAM="vault",
        VAULT_ADDR="https://vault:8200",
        ZTBANK_VAULT_APPROLE_FILE="approle.json",
        ZTBANK_VAULT_ROOT_MOUNT="ztbank_root",
    )
    assert message == (
        "invalid setting: ZTBANK_UPSTREAM=vault needs ZTBANK_VAULT_ROOT_CA: the PEM file of the"
        " root CA of Vault's ztbank_root mount, the only root the issuer trusts"
    )


def test_vault_approle_file_and_inline_approle_are_exclusive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = refusal(
        monkeypatch,
        **VAULT,
        ZTBANK_VAULT_APPROLE_FILE="approle.json",
        ZTBANK_VAULT_ROLE_ID="role",
        ZTBANK_VAULT_SECRET_ID="secret-id-do-not-leak",
    )
    assert message == (
        "invalid setting: ZTBANK_VAULT_APPROLE_FILE and ZTBANK_VAULT_ROLE_ID/ZTBANK_VAULT_SECRET_ID"
        " are alternatives: set only one"
    )


def test_vault_without_credentials_lists_the_three_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    assert refusal(monkeypatch, **VAULT) == (
        "invalid setting: ZTBANK_UPSTREAM=vault needs ZTBANK_VAULT_APPROLE_FILE, or"
        " ZTBANK_VAULT_ROLE_ID and ZTBANK_VAULT_SECRET_ID, or VAULT_TOKEN"
    )


def test_garbage_duration_message_says_how_to_write_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "e.g. 20s" in refusal(monkeypatch, ZTBANK_SVID_TTL="five minutes")


def _socket_of_bytes(size: int) -> str:
    prefix = "/tmp/"
    return prefix + "s" * (size - len(prefix))


@pytest.mark.parametrize("variable", ENDPOINT_VARIABLES)
@pytest.mark.parametrize("value", ["relative.sock", "unix://relative.sock", "unix:relative.sock"])
def test_relative_socket_path_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    assert "absolute" in refusal(monkeypatch, **{variable: value})


def test_socket_path_longer_than_sockaddr_un_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    path = _socket_of_bytes(108)
    assert "107 bytes" in refusal(monkeypatch, SPIFFE_ENDPOINT_SOCKET=f"unix://{path}")


def test_socket_path_of_107_bytes_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    path = _socket_of_bytes(107)
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{path}")
    assert str(load_settings(IssuerSettings).workload_socket) == path


def test_long_ztbank_home_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default socket lives under ZTBANK_HOME, so a deep home cannot hold it.
    assert "107 bytes" in refusal(monkeypatch, ZTBANK_HOME="/tmp/" + "h" * 100)


def test_socket_path_limit_counts_bytes_not_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    path = "/tmp/" + "\u00e9" * 60  # 65 characters, 125 bytes
    assert len(path.encode()) > 107
    assert "107 bytes" in refusal(monkeypatch, SPIFFE_ENDPOINT_SOCKET=f"unix://{path}")


@pytest.mark.parametrize("value", ["relative.sock", "unix:///tmp/" + "s" * 110])
def test_socket_refusal_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = refusal(monkeypatch, SPIFFE_ENDPOINT_SOCKET=value)
    assert any(variable in message for variable in ENDPOINT_VARIABLES)


def test_crl_ttl_refusal_says_the_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, ZTBANK_SVID_TTL="1m", ZTBANK_CRL_TTL="2m")
    assert "between 5s and ZTBANK_SVID_TTL (1m; got 2m)" in message


def test_crl_ttl_follows_a_shorter_svid_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTBANK_SVID_TTL", "20s")
    assert load_settings(IssuerSettings).crl_validity == timedelta(seconds=20)


def test_every_address_is_allowed_with_a_public_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTBANK_ISSUER_HTTP", "0.0.0.0:8180")
    monkeypatch.setenv("ZTBANK_ISSUER_PUBLIC_URL", "http://issuer:8180")
    settings = load_settings(IssuerSettings)
    assert (settings.issuer_http, settings.issuer_url) == ("0.0.0.0:8180", "http://issuer:8180")
