"""Bootstrap a Vault server (not -dev) as ztbank's upstream authority; safe to run again.

Each step reads Vault's current state first and only writes what is missing or different:
initialise (demo only: one key share) and unseal; ``pki`` with an internal EC root CA;
``pki_int`` with an intermediate signed by that root; the ``spiffe-svid`` role; the
``ztbank-issuer`` policy; AppRole auth with a ``ztbank-issuer`` role whose role_id and secret_id
are written for the issuer; optionally, the root CA written out for the issuer to pin
(``--root-ca-out``) and a file audit device checked (``--audit-file``).

Exit status: 0 done, 1 Vault refused or is in a state this script will not repair, 2 bad input or
Vault unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
from cryptography import x509

from services.common.errors import InvalidSpiffeIdError
from services.common.files import PRIVATE_MODE, PUBLIC_MODE, write_atomic
from services.common.identity.spiffe_id import (
    DEFAULT_TRUST_DOMAIN,
    SCHEME_PREFIX,
    validate_trust_domain,
)

ROOT_MOUNT = "pki"
INT_MOUNT = "pki_int"
ROOT_MAX_LEASE_HOURS = 87600
INT_MAX_LEASE_HOURS = 43800
ROOT_COMMON_NAME = "ztbank root CA"
INT_COMMON_NAME = "ztbank intermediate CA"
SVID_ROLE = "spiffe-svid"
ISSUER_POLICY = "ztbank-issuer"
APPROLE_MOUNT = "approle"
ISSUER_APPROLE = "ztbank-issuer"
# The issuer logs in again when its token expires instead of renewing it, so one hour is both
# the TTL and the maximum.
ISSUER_TOKEN_TTL_SECONDS = 3600

Report = Callable[[str, bool], None]


class UsageError(Exception):
    """The command line or a file it names is wrong; exit 2."""


class BootstrapError(Exception):
    """Vault is in a state this script will not repair on its own; exit 1."""


@dataclass(frozen=True)
class Plan:
    trust_domain: str
    public_url: str
    approle_out: Path
    root_ca_out: Path | None = None
    audit_file: str | None = None


@dataclass(frozen=True)
class InitSecrets:
    unseal_keys_b64: tuple[str, ...]
    root_token: str


# Generous: Vault answers the first `sys/init` only once raft storage has elected its node, and
# an init that times out here has still happened, with its one unseal key shown to nobody.
CALL_TIMEOUT = 60.0


def connect(address: str, ca_cert: str | None, timeout: float = CALL_TIMEOUT) -> hvac.Client:
    """A client with no token yet; an explicit empty one keeps hvac from reading VAULT_TOKEN."""
    return hvac.Client(url=address, token="", verify=ca_cert or True, timeout=timeout)


def _object(result: object, what: str) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise BootstrapError(f"Vault did not answer {what} with a JSON object")
    return result


def _data(result: object, what: str) -> dict[str, Any]:
    data = _object(result, what).get("data")
    if not isinstance(data, dict):
        raise BootstrapError(f"Vault's answer to {what} holds no 'data' object")
    return data


def _string(data: dict[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise BootstrapError(f"Vault's answer to {what} holds no {key!r}")
    return value


def _read(what: str, call: Callable[[], object]) -> dict[str, Any] | None:
    """The data at a Vault path, or None when nothing is stored there (404, or 204 No Content)."""
    try:
        result = call()
    except hvac.exceptions.InvalidPath:
        return None
    if getattr(result, "status_code", None) == 204:
        return None
    answer = _object(result, what)
    data = answer.get("data")
    # sys/ endpoints repeat their fields at the top level; older ones have no "data".
    return data if isinstance(data, dict) else answer


def _ensure(
    what: str, read: Callable[[], object], wanted: Mapping[str, Any], write: Callable[[], object]
) -> bool:
    """``write()`` unless what ``read()`` returns already holds every field of ``wanted``;
    True if it wrote."""
    current = _read(what, read)
    if current is not None and all(current.get(key) == value for key, value in wanted.items()):
        return False
    write()
    return True


def _read_init_file(path: Path) -> InitSecrets:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read --init-file {path}: {error}") from None
    keys = content.get("unseal_keys_b64") if isinstance(content, dict) else None
    token = content.get("root_token") if isinstance(content, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys) or not keys:
        raise UsageError(f"--init-file {path} has no 'unseal_keys_b64' list")
    if not isinstance(token, str) or not token:
        raise UsageError(f"--init-file {path} has no 'root_token'")
    return InitSecrets(tuple(keys), token)


def ensure_initialised(client: hvac.Client, init_file: Path | None) -> str | None:
    """Initialise Vault if it is not; return the new root token, or None if it already was."""
    if _object(client.sys.read_init_status(), "GET sys/init").get("initialized") is True:
        return None
    if init_file is None:
        raise UsageError("Vault is not initialised: give --init-file to keep its unseal key")
    if init_file.exists():
        raise BootstrapError(
            f"Vault is not initialised but {init_file} exists and may hold another Vault's keys;"
            " move it away first"
        )
    # Fail before initialising, not after: Vault shows the unseal key exactly once.
    init_file.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(init_file.parent, os.W_OK):
        raise UsageError(f"cannot write --init-file in {init_file.parent}")
    answer = _object(client.sys.initialize(secret_shares=1, secret_threshold=1), "PUT sys/init")
    keys_b64, keys_hex = answer.get("keys_base64"), answer.get("keys")
    root_token = _string(answer, "root_token", "PUT sys/init")
    if not isinstance(keys_b64, list) or not keys_b64:
        raise BootstrapError("Vault's answer to PUT sys/init holds no unseal key")
    # The field names of `vault operator init -format=json`, so either can feed --init-file.
    secrets = {
        "unseal_keys_b64": keys_b64,
        "unseal_keys_hex": keys_hex,
        "unseal_shares": 1,
        "unseal_threshold": 1,
        "root_token": root_token,
    }
    write_atomic(init_file, json.dumps(secrets, indent=2).encode() + b"\n", PRIVATE_MODE)
    return root_token


def ensure_unsealed(client: hvac.Client, init_file: Path | None) -> bool:
    if _object(client.sys.read_seal_status(), "GET sys/seal-status").get("sealed") is not True:
        return False
    if init_file is None:
        raise UsageError("Vault is sealed: give --init-file holding its unseal key")
    for key in _read_init_file(init_file).unseal_keys_b64:
        status = _object(client.sys.submit_unseal_key(key=key), "PUT sys/unseal")
        if status.get("sealed") is False:
            return True
    raise BootstrapError(f"Vault is still sealed after every unseal key in {init_file}")


def wait_until_active(client: hvac.Client, *, attempts: int = 60, delay: float = 0.5) -> None:
    """Wait for an unsealed node to take the active role (raft storage elects one first)."""
    for _ in range(attempts):
        health = client.sys.read_health_status(method="GET")
        if isinstance(health, dict) and health.get("sealed") is False:
            return
        time.sleep(delay)
    raise BootstrapError(f"Vault did not become active within {attempts * delay:.0f}s")


def ensure_pki_engine(client: hvac.Client, path: str, max_lease_hours: int) -> bool:
    mounts = _read("GET sys/mounts", client.sys.list_mounted_secrets_engines) or {}
    mount = mounts.get(f"{path}/")
    if not isinstance(mount, dict):
        client.sys.enable_secrets_engine(
            backend_type="pki", path=path, config={"max_lease_ttl": f"{max_lease_hours}h"}
        )
        return True
    if mount.get("type") != "pki":
        raise BootstrapError(f"{path}/ is already mounted as {mount.get('type')!r}, not pki")
    config = mount.get("config")
    if isinstance(config, dict) and config.get("max_lease_ttl") == max_lease_hours * 3600:
        return False
    client.sys.tune_mount_configuration(path=path, max_lease_ttl=f"{max_lease_hours}h")
    return True


def ensure_urls(client: hvac.Client, mount: str, public_url: str) -> bool:
    """Point AIA, CRL and OCSP at ``public_url`` so relying parties can fetch them."""
    base = f"{public_url.rstrip('/')}/v1/{mount}"
    wanted = {
        "issuing_certificates": [f"{base}/ca"],
        "crl_distribution_points": [f"{base}/crl"],
        "ocsp_servers": [f"{base}/ocsp"],
    }
    return _ensure(
        f"GET {mount}/config/urls",
        lambda: client.secrets.pki.read_urls(mount_point=mount),
        wanted,
        lambda: client.secrets.pki.set_urls(wanted, mount_point=mount),
    )


def _ca_pem(client: hvac.Client, mount: str) -> str:
    pem = client.secrets.pki.read_ca_certificate(mount_point=mount)
    return pem.strip() if isinstance(pem, str) else ""


def _check_trust_domain(pem: str, trust_domain: str, mount: str) -> None:
    """Refuse to build on a CA of another trust domain rather than silently mixing two."""
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode())
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        uris = []
    if f"{SCHEME_PREFIX}{trust_domain}" not in uris:
        raise BootstrapError(
            f"{mount} already holds a CA whose URI SANs are {uris or 'empty'},"
            f" not {SCHEME_PREFIX}{trust_domain}"
        )


def ensure_root_ca(client: hvac.Client, mount: str, trust_domain: str) -> bool:
    existing = _ca_pem(client, mount)
    if existing:
        _check_trust_domain(existing, trust_domain, mount)
        return False
    client.secrets.pki.generate_root(
        type="internal",
        common_name=ROOT_COMMON_NAME,
        extra_params={
            "key_type": "ec",
            "key_bits": 384,
            "uri_sans": f"{SCHEME_PREFIX}{trust_domain}",
            "exclude_cn_from_sans": True,
            "ttl": f"{ROOT_MAX_LEASE_HOURS}h",
        },
        mount_point=mount,
    )
    return True


def ensure_intermediate_ca(
    client: hvac.Client, mount: str, root_mount: str, trust_domain: str
) -> bool:
    existing = _ca_pem(client, mount)
    if existing:
        _check_trust_domain(existing, trust_domain, mount)
        return False
    what = f"POST {mount}/intermediate/generate/internal"
    generated = client.secrets.pki.generate_intermediate(
        type="internal",
        common_name=INT_COMMON_NAME,
        extra_params={"key_type": "ec", "key_bits": 256},
        mount_point=mount,
    )
    csr = _string(_data(generated, what), "csr", what)
    what = f"POST {root_mount}/root/sign-intermediate"
    signed = client.secrets.pki.sign_intermediate(
        csr=csr,
        common_name=INT_COMMON_NAME,
        extra_params={
            "uri_sans": f"{SCHEME_PREFIX}{trust_domain}",
            "ttl": f"{INT_MAX_LEASE_HOURS}h",
            "format": "pem",
            "use_csr_values": False,
            "exclude_cn_from_sans": True,
            # pki_int signs the issuer's CA, which signs only leaves.
            "max_path_length": 1,
        },
        mount_point=root_mount,
    )
    certificate = _string(_data(signed, what), "certificate", what)
    client.secrets.pki.set_signed_intermediate(certificate=certificate, mount_point=mount)
    return True


def svid_role(trust_domain: str) -> dict[str, Any]:
    """X509-SVIDs only: a SPIFFE ID of the trust domain, no DNS names, IPs or CN required."""
    return {
        "allowed_uri_sans": [f"{SCHEME_PREFIX}{trust_domain}/*"],
        "allowed_domains": [],
        "allow_any_name": False,
        "allow_bare_domains": False,
        "allow_subdomains": False,
        "allow_localhost": False,
        "allow_ip_sans": False,
        "require_cn": False,
        "key_type": "ec",
        "key_bits": 256,
        "ttl": 300,
        "max_ttl": 600,
        "server_flag": True,
        "client_flag": True,
    }


def ensure_svid_role(client: hvac.Client, mount: str, trust_domain: str) -> bool:
    wanted = svid_role(trust_domain)
    return _ensure(
        f"GET {mount}/roles/{SVID_ROLE}",
        lambda: client.secrets.pki.read_role(name=SVID_ROLE, mount_point=mount),
        wanted,
        lambda: client.secrets.pki.create_or_update_role(
            name=SVID_ROLE, extra_params=dict(wanted), mount_point=mount
        ),
    )


def issuer_policy(int_mount: str, root_mount: str) -> str:
    """What the issuer may do: have its CA signed by ``int_mount`` and read the CA certificates."""
    grants = [
        (f"{int_mount}/root/sign-intermediate", "update"),
        (f"{root_mount}/ca/pem", "read"),
        (f"{int_mount}/ca/pem", "read"),
        (f"{int_mount}/cert/ca_chain", "read"),
    ]
    return "\n".join(
        f'path "{path}" {{\n  capabilities = ["{capability}"]\n}}\n' for path, capability in grants
    )


def ensure_policy(client: hvac.Client, name: str, rules: str) -> bool:
    current = _read(f"GET sys/policy/{name}", lambda: client.sys.read_policy(name=name))
    existing = current.get("rules") if current else None
    if isinstance(existing, str) and existing.strip() == rules.strip():
        return False
    client.sys.create_or_update_policy(name=name, policy=rules)
    return True


def ensure_auth_method(client: hvac.Client, path: str, method_type: str) -> bool:
    methods = _read("GET sys/auth", client.sys.list_auth_methods) or {}
    method = methods.get(f"{path}/")
    if not isinstance(method, dict):
        client.sys.enable_auth_method(method_type=method_type, path=path)
        return True
    if method.get("type") != method_type:
        raise BootstrapError(f"auth/{path}/ is already {method.get('type')!r}, not {method_type}")
    return False


def issuer_approle(policy: str) -> dict[str, Any]:
    # secret_id_ttl 0: the demo issuer's secret_id never expires, so restarts keep working.
    return {
        "token_policies": [policy],
        "token_ttl": ISSUER_TOKEN_TTL_SECONDS,
        "token_max_ttl": ISSUER_TOKEN_TTL_SECONDS,
        "bind_secret_id": True,
        "secret_id_ttl": 0,
        "secret_id_num_uses": 0,
    }


def ensure_approle(client: hvac.Client, role: str, policy: str, mount: str) -> bool:
    wanted = issuer_approle(policy)
    return _ensure(
        f"GET auth/{mount}/role/{role}",
        lambda: client.auth.approle.read_role(role_name=role, mount_point=mount),
        wanted,
        lambda: client.auth.approle.create_or_update_approle(
            role_name=role, mount_point=mount, **wanted
        ),
    )


def _secret_id_is_live(client: hvac.Client, role: str, mount: str, secret_id: str) -> bool:
    try:
        answer = client.auth.approle.read_secret_id(
            role_name=role, secret_id=secret_id, mount_point=mount
        )
    except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
        return False
    # An unknown secret_id is answered with 204 No Content rather than an error.
    return isinstance(answer, dict) and isinstance(answer.get("data"), dict)


def ensure_approle_credentials(client: hvac.Client, role: str, mount: str, out: Path) -> bool:
    """Keep the role_id/secret_id in ``out`` if Vault still accepts them, else issue new ones."""
    what = f"GET auth/{mount}/role/{role}/role-id"
    role_id = _string(
        _data(client.auth.approle.read_role_id(role_name=role, mount_point=mount), what),
        "role_id",
        what,
    )
    try:
        saved = json.loads(out.read_text())
    except (OSError, ValueError):
        saved = None
    if (
        isinstance(saved, dict)
        and saved.get("role_id") == role_id
        and isinstance(saved.get("secret_id"), str)
        and _secret_id_is_live(client, role, mount, saved["secret_id"])
    ):
        return False
    what = f"POST auth/{mount}/role/{role}/secret-id"
    secret_id = _string(
        _data(client.auth.approle.generate_secret_id(role_name=role, mount_point=mount), what),
        "secret_id",
        what,
    )
    credentials = {"role_id": role_id, "secret_id": secret_id}
    write_atomic(out, json.dumps(credentials, indent=2).encode() + b"\n", PRIVATE_MODE)
    return True


def ensure_file_audit(client: hvac.Client, file_path: str) -> bool:
    """A file audit device writing to ``file_path``: Vault's own record of every request, with
    secrets HMAC-hashed.  OpenBao enables audit devices only from its configuration file; Vault
    also through the API, which is tried when the device is missing."""
    devices = _read("GET sys/audit", client.sys.list_enabled_audit_devices) or {}
    for device in devices.values():
        if not isinstance(device, dict) or device.get("type") != "file":
            continue
        options = device.get("options")
        if isinstance(options, dict) and options.get("file_path") == file_path:
            return False
    try:
        client.sys.enable_audit_device(
            device_type="file", path="file", options={"file_path": file_path}
        )
    except hvac.exceptions.InvalidRequest as error:
        raise BootstrapError(
            f"Vault has no file audit device writing to {file_path}, and refused to enable one"
            f' ({error}): add `audit "file" "file" {{ options {{ file_path ='
            f' "{file_path}" }} }}` to its configuration'
        ) from None
    return True


def ensure_root_ca_file(client: hvac.Client, mount: str, out: Path) -> bool:
    """Write the root CA certificate for the issuer to pin; True if the file changed."""
    pem = _ca_pem(client, mount)
    if not pem:
        raise BootstrapError(f"{mount} holds no CA certificate to write to {out}")
    data = pem.encode() + b"\n"
    try:
        if out.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomic(out, data, PUBLIC_MODE)
    return True


def configure(client: hvac.Client, plan: Plan, report: Report) -> None:
    """Every step after unsealing; ``client`` must hold a root (or equivalent) token."""
    td = plan.trust_domain
    report(
        f"secrets engine {ROOT_MOUNT}/", ensure_pki_engine(client, ROOT_MOUNT, ROOT_MAX_LEASE_HOURS)
    )
    report(f"{ROOT_MOUNT}/config/urls", ensure_urls(client, ROOT_MOUNT, plan.public_url))
    report(f"root CA in {ROOT_MOUNT}", ensure_root_ca(client, ROOT_MOUNT, td))
    report(
        f"secrets engine {INT_MOUNT}/", ensure_pki_engine(client, INT_MOUNT, INT_MAX_LEASE_HOURS)
    )
    report(f"{INT_MOUNT}/config/urls", ensure_urls(client, INT_MOUNT, plan.public_url))
    report(
        f"intermediate CA in {INT_MOUNT}",
        ensure_intermediate_ca(client, INT_MOUNT, ROOT_MOUNT, td),
    )
    report(f"{INT_MOUNT}/roles/{SVID_ROLE}", ensure_svid_role(client, INT_MOUNT, td))
    report(
        f"policy {ISSUER_POLICY}",
        ensure_policy(client, ISSUER_POLICY, issuer_policy(INT_MOUNT, ROOT_MOUNT)),
    )
    report(f"auth method {APPROLE_MOUNT}/", ensure_auth_method(client, APPROLE_MOUNT, "approle"))
    report(
        f"AppRole {ISSUER_APPROLE}",
        ensure_approle(client, ISSUER_APPROLE, ISSUER_POLICY, APPROLE_MOUNT),
    )
    report(
        f"AppRole credentials in {plan.approle_out}",
        ensure_approle_credentials(client, ISSUER_APPROLE, APPROLE_MOUNT, plan.approle_out),
    )
    if plan.root_ca_out is not None:
        report(
            f"root CA in {plan.root_ca_out}",
            ensure_root_ca_file(client, ROOT_MOUNT, plan.root_ca_out),
        )
    if plan.audit_file is not None:
        report(f"file audit device {plan.audit_file}", ensure_file_audit(client, plan.audit_file))


def _root_token_from(init_file: Path | None) -> str:
    if init_file is None:
        raise UsageError("no Vault token: set VAULT_TOKEN or give --init-file with a root token")
    return _read_init_file(init_file).root_token


def bootstrap(
    client: hvac.Client,
    plan: Plan,
    *,
    init_file: Path | None,
    token: str | None,
    report: Report,
) -> None:
    """Initialise, unseal and configure; ``token`` is used unless this run initialises Vault."""
    root_token = ensure_initialised(client, init_file)
    report("initialised", root_token is not None)
    report("unsealed", ensure_unsealed(client, init_file))
    wait_until_active(client)
    client.token = root_token or token or _root_token_from(init_file)
    configure(client, plan, report)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bootstrap.py",
        description="Idempotently bootstrap a Vault server as ztbank's upstream authority.",
        epilog="Authenticates with VAULT_TOKEN, or with the root token of --init-file.",
    )
    parser.add_argument(
        "--vault-addr",
        default=os.environ.get("VAULT_ADDR", ""),
        help="Vault's address (default: $VAULT_ADDR)",
    )
    parser.add_argument(
        "--ca-cert",
        default=os.environ.get("VAULT_CACERT") or None,
        help="CA bundle verifying Vault's TLS certificate (default: $VAULT_CACERT)",
    )
    parser.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain (default: {DEFAULT_TRUST_DOMAIN})",
    )
    parser.add_argument(
        "--init-file",
        type=Path,
        help=(
            "demo-only: JSON file (mode 0600) that receives the single unseal key and the root"
            " token when this script initialises Vault, and is read back to unseal it; real"
            " deployments split the key among several holders or use auto-unseal"
        ),
    )
    parser.add_argument(
        "--approle-out",
        type=Path,
        required=True,
        help="JSON file (mode 0600) that receives the issuer's AppRole role_id and secret_id",
    )
    parser.add_argument(
        "--root-ca-out",
        type=Path,
        help="file that receives the root CA certificate of the pki mount, for the issuer to pin",
    )
    parser.add_argument(
        "--audit-file",
        help="check (or, on Vault, enable) a file audit device writing to this path in Vault",
    )
    parser.add_argument(
        "--public-url",
        help="Vault's address as clients see it, for AIA/CRL/OCSP URLs (default: --vault-addr)",
    )
    return parser


def _http_url(value: str, option: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{option} must be an http(s) URL, not {value!r}")
    return value.rstrip("/")


def _print_step(step: str, changed: bool) -> None:
    print(f"{'changed' if changed else 'ok':>7}  {step}")


def _fail(message: str) -> None:
    print(f"bootstrap.py: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    address = ""
    try:
        args = _parser().parse_args(argv)
        address = _http_url(args.vault_addr, "--vault-addr")
        public_url = _http_url(args.public_url or address, "--public-url")
        if args.ca_cert and not Path(args.ca_cert).is_file():
            raise UsageError(f"--ca-cert {args.ca_cert} is not a file")
        try:
            trust_domain = validate_trust_domain(args.trust_domain)
        except InvalidSpiffeIdError as error:
            raise UsageError(f"--trust-domain: {error}") from None
        bootstrap(
            connect(address, args.ca_cert),
            Plan(trust_domain, public_url, args.approle_out, args.root_ca_out, args.audit_file),
            init_file=args.init_file,
            token=os.environ.get("VAULT_TOKEN") or None,
            report=_print_step,
        )
    except UsageError as error:
        _fail(str(error))
        return 2
    except requests.RequestException as error:
        _fail(f"cannot reach Vault at {address}: {error}")
        return 2
    except hvac.exceptions.VaultError as error:
        _fail(f"Vault refused: {type(error).__name__}: {error}")
        return 1
    except (BootstrapError, OSError) as error:
        _fail(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
