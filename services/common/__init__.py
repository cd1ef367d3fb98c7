"""Library shared by every ztbank service: identity, durations, errors."""
