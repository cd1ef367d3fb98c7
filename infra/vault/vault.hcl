# Vault (OpenBao 2.7, infra/vault/Dockerfile) of the compose stack: server mode, NOT -dev.
# Initialised and unsealed by infra/vault/bootstrap.py (the one-shot `vault-bootstrap`, run by
# every `make up`, so a restarted Vault is unsealed again). The native stack's config is made in
# code (services/stack/vault*.py); this file is compose's only.
# DEMO ONLY: one unseal key, kept with the root token in the `vault-bootstrap` volume.

ui = true

# Integrated storage (raft) on the `vault-data` volume: one node. performance_multiplier 1 (the
# production timing): with the default (5) the lone node waits 5-10 s before it elects itself,
# and the first `sys/init` waits for that. Seen here: an init that outlasted the bootstrap's 10 s
# read timeout, so Vault was initialised and its one-time unseal key never reached init.json.
storage "raft" {
  path                   = "/vault/data"
  node_id                = "vault-1"
  performance_multiplier = 1
}

# TLS with a CA of its own (the one-shot `vault-tls`: `ztbank vault tls`), in the `vault-tls`
# volume; server.key is 0600 and owned by this server's uid (10010).
listener "tcp" {
  address         = "0.0.0.0:8200"
  tls_cert_file   = "/vault/tls/server.pem"
  tls_key_file    = "/vault/tls/server.key"
  tls_min_version = "tls12"
}

# Every request and response, secrets HMAC-hashed, on the `vault-logs` volume. OpenBao creates
# audit devices from its configuration only (not through the API); vault-bootstrap checks this
# one is there (--audit-file) and `make test-compose` reads it.
audit "file" "file" {
  description = "ztbank: every request, secrets hashed"
  options {
    file_path = "/vault/logs/audit.log"
  }
}

api_addr     = "https://vault:8200"
cluster_addr = "https://vault:8201"

# mlock off: raft keeps its data in memory-mapped BoltDB files, which mlock would pin whole in
# RAM (the advice for integrated storage is to disable it), and the container gets no IPC_LOCK
# capability to mlock with. OpenBao 2.7 has no mlock setting and logs "unknown or unsupported
# field disable_mlock" at start (expected): the line states the choice for whoever swaps in a
# server that has one. The cost: on a host with swap, Vault's memory (keys included) may be
# swapped out; the demo accepts it (our machines have no swap).
disable_mlock = true
