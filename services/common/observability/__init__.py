"""Traces, metrics and logs (OpenTelemetry)."""
