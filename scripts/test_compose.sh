#!/bin/sh
# `make test-compose`: the e2e suites inside the compose network, against a fresh compose stack.
#
# Brings the stack up under its own project name (a demo stack's containers and volumes are left
# alone) with 20 s SVIDs, so that the rotation suite fits its deadline, and host ports left to
# Docker (no clash with a demo stack on the usual ports); runs the `e2e` service (profile "test");
# always tears everything down with its volumes, also on failure or Ctrl-C; exits with the
# suites' exit code (1 if the stack never became healthy).
set -u
export COMPOSE_PROJECT_NAME="${ZTBANK_E2E_PROJECT:-ztbank-e2e}"
export ZTBANK_SVID_TTL=20s
# Empty host ports publish on ports Docker picks ("127.0.0.1::8443").
export VAULT_PORT= CONSUL_PORT= GATEWAY_PORT= JAEGER_UI_PORT= PROMETHEUS_PORT= GRAFANA_PORT=

compose() { docker compose --profile test "$@"; }

teardown() {
    echo "test-compose: tearing down $COMPOSE_PROJECT_NAME (containers and volumes)"
    compose down --volumes --remove-orphans
}
trap 'teardown; exit 130' INT TERM

status=0
if compose build && docker compose up --detach --wait; then
    compose run --rm e2e tests/e2e -p no:cacheprovider -rs "$@" || status=$?
else
    status=1
    echo "test-compose: the stack did not come up healthy" >&2
    compose ps --all >&2
    compose logs --tail 50 >&2
fi
trap - INT TERM
teardown
exit "$status"
