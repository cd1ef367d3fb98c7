"""The ``ztbank`` command groups, one module each: it owns its sub-parsers (names, flags, help
text) and its handlers, and adds them with ``register(groups)``.  ``services.cli.main`` only
puts them together, runs the handler chosen, and turns an error into an exit code."""
