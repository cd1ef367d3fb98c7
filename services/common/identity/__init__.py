"""SPIFFE identities: IDs, X509-SVID verification and PEM helpers."""
