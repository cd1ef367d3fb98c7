"""Codes from the IANA TLS Cipher Suites registry, written out here so that tests check the
audit's ``cipher_code`` against the registry rather than against OpenSSL's own table."""

from __future__ import annotations

TLS_SUITE_CODES = {
    # TLS 1.3
    "TLS_AES_128_GCM_SHA256": "0x1301",
    "TLS_AES_256_GCM_SHA384": "0x1302",
    "TLS_CHACHA20_POLY1305_SHA256": "0x1303",
    # TLS 1.2, the ECDHE + AEAD suites ztbank allows (OpenSSL names)
    "ECDHE-ECDSA-AES128-GCM-SHA256": "0xC02B",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "0xC02C",
    "ECDHE-RSA-AES128-GCM-SHA256": "0xC02F",
    "ECDHE-RSA-AES256-GCM-SHA384": "0xC030",
    "ECDHE-RSA-CHACHA20-POLY1305": "0xCCA8",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "0xCCA9",
}
