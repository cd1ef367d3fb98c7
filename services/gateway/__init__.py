"""The gateway: the public REST API of the bank for channel apps (FastAPI behind mTLS)."""
