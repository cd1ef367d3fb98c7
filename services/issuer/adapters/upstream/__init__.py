"""The issuer's upstream CAs, each behind ``services.issuer.domain.upstream.UpstreamAuthority``:
the root key on disk (``disk``) and Vault's PKI (``vault``)."""
