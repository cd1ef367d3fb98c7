"""The bare pipeline's throwaway CA: what each certificate names and may do."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from loadtest.bare.certs import make_certs


def test_every_identity_is_signed_by_the_ca_with_its_names(tmp_path: Path) -> None:
    files = make_certs(tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = {}
    for name, found in files.items():
        cert = x509.load_pem_x509_certificate(found.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names[name] = (
            san.get_values_for_type(x509.DNSName),
            san.get_values_for_type(x509.IPAddress),
        )
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usages
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
        assert oct(found.key.stat().st_mode & 0o777) == "0o600"
        assert found.ca == tmp_path / "ca.pem"
    assert names["gateway"] == (["localhost"], [ipaddress.ip_address("127.0.0.1")])
    assert names["engine"] == (["engine"], [])
    assert names["risk"] == (["risk"], [])
