"""What every service process shares: its runtime (identity source, mTLS verifier, telemetry,
audit) and its entrypoint."""
