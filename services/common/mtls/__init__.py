"""Mutual TLS on every hop: TLS contexts from SVIDs, the gRPC and HTTPS transports, and the
verified peer each request carries."""
