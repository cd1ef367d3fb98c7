"""What the gateway talks to: the transfer-engine over gRPC, the token key on disk."""
