"""Circuit breaking by identity: circuit, window, peer_watch, trust_table, settings, trailers,
metrics, watched."""
