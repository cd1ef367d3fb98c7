#!/bin/sh
# Compose only (the one-shot `entries` service): register gateway, transfer-engine and risk with
# the issuer by unix:uid selectors (each container runs as its own uid on the one shared
# Workload API socket), and the teller (channel app), ops (health probes) and console identities
# by the uids the labs, the console and the e2e harness switch to. Idempotent: an entry with the same SPIFFE ID and selectors is kept.
# Runs as the issuer's uid with the issuer's volume: the admin socket is mode 0600.
set -eu
td="${ZTBANK_TRUST_DOMAIN:?}"
existing="$(ztbank entry list --json)"

ensure() { # NAME TEAM UID [DNS-NAME]
    id="spiffe://$td/env/prod/zone/az1/team/$2/svc/$1"
    selector="unix:uid:$3"
    if printf '%s' "$existing" | python -c '
import json, sys
entries = json.load(sys.stdin)
sys.exit(0 if any(e["spiffe_id"] == sys.argv[1] and e["selectors"] == [sys.argv[2]]
                  for e in entries) else 1)' "$id" "$selector"; then
        echo "entry exists for $id ($selector)"
    elif [ -n "${4:-}" ]; then
        ztbank entry create --spiffe-id "$id" --selector "$selector" --dns-name "$4"
    else
        ztbank entry create --spiffe-id "$id" --selector "$selector"
    fi
}

ensure gateway channels "${GATEWAY_UID:?}"
# grpcio clients check a DNS name: the gRPC services' SVIDs carry their service name.
ensure transfer-engine payments "${TRANSFER_ENGINE_UID:?}" transfer-engine
ensure risk risk "${RISK_UID:?}" risk
ensure teller channels "${TELLER_UID:?}"
ensure ops platform "${OPS_UID:?}"
ensure console platform "${CONSOLE_UID:?}"
