"""The live lab console: one web page on 127.0.0.1 that shows the native stack working (identity,
health, decisions, latency, revocations) and runs the labs."""
