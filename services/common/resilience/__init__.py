"""Identity-aware circuit breaking of calls to other services."""
