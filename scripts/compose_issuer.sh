#!/bin/sh
# Compose only: start the issuer with the AppRole that vault-bootstrap wrote to the
# `vault-bootstrap` volume (ZTBANK_VAULT_ROLE_ID / ZTBANK_VAULT_SECRET_ID are read from
# $ZTBANK_APPROLE_FILE so that they never appear in compose.yaml or `docker inspect`).
set -eu
approle="${ZTBANK_APPROLE_FILE:-/vault/bootstrap/approle.json}"
if [ ! -r "$approle" ]; then
    echo "compose_issuer.sh: cannot read $approle (did vault-bootstrap run?)" >&2
    exit 2
fi
ZTBANK_VAULT_ROLE_ID="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["role_id"])' "$approle")"
ZTBANK_VAULT_SECRET_ID="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["secret_id"])' "$approle")"
export ZTBANK_VAULT_ROLE_ID ZTBANK_VAULT_SECRET_ID
exec ztbank issuer run "$@"
