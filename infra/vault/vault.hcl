# Vault server for the compose stack (server mode, NOT -dev): file storage on the `vault-data`
# volume, initialised and unsealed by infra/vault/bootstrap.py (the `vault-bootstrap` service).
# DEMO ONLY: plain HTTP on the compose network, one unseal key kept in a volume.
ui            = true
disable_mlock = false # the container gets IPC_LOCK

storage "file" {
  path = "/vault/file"
}

listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true
}

api_addr = "http://vault:8200"
