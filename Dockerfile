# syntax=docker/dockerfile:1
# One image for every ztbank Python process of the compose stack (issuer, gateway,
# transfer-engine, risk, the one-shot jobs vault-tls, vault-bootstrap and entries), plus `load`
# (locust) and `test` (the e2e suites) targets. Never the `vault` extra: the bao binary (~180 MB)
# is in the vault image only (infra/vault/Dockerfile).
#   docker compose build            # target runtime (the last stage, the default)
#   make images OFFLINE=1           # no registry: a local Debian base and a host-made wheelhouse
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# ---- deps: the pinned dependencies in a venv (build tools allowed in these stages only) ------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# OFFLINE=1: pip inside the build reaches no index (air-gapped, or no TLS to it from containers);
# every dependency comes from wheelhouse/, which scripts/wheelhouse.sh fills on the host from the
# same constraints.txt. The glob keeps this COPY valid when there is no wheelhouse/ (online builds).
ARG OFFLINE=
COPY constraints.txt wheelhouse* /wheelhouse/
RUN if [ -n "$OFFLINE" ]; then \
        printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > /etc/pip.conf; \
    fi
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what names the dependencies: these layers stay cached while the source changes.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('/tmp/requirements.txt', 'w').write('\\n'.join(p['dependencies'])); \
open('/tmp/requirements-dev.txt', 'w').write('\\n'.join(p['optional-dependencies']['dev']))"
RUN pip install -c constraints.txt -r /tmp/requirements.txt

# ---- builder: ztbank itself, built once as a wheel, installed into the runtime venv ---------
FROM deps AS builder
COPY README.md LICENSE ./
COPY services/ services/
RUN pip wheel --no-deps -w /dist . && pip install --no-deps /dist/*.whl

# ---- load-builder: the dependencies plus locust (dev dependency), then ztbank ----------------
FROM deps AS load-builder
RUN pip install -c constraints.txt locust
COPY --from=builder /dist /dist
RUN pip install --no-deps /dist/*.whl

# ---- test-builder: the dependencies plus the dev ones (pytest, ...), then ztbank -------------
FROM deps AS test-builder
RUN pip install -c constraints.txt -r /tmp/requirements-dev.txt
COPY --from=builder /dist /dist
RUN pip install --no-deps /dist/*.whl

# ---- base: what every final image shares (no compiler, no pip cache, non-root) -------------
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ZTBANK_HOME=/var/lib/ztbank
# One uid per workload: the issuer attests them with unix:uid selectors on one shared socket.
# The directories below are the mount points of named volumes; a new volume takes the owner and
# mode of its mount point from the image.
RUN set -eux; \
    groupadd --system --gid 10000 ztbank; \
    useradd --system --uid 10000 --gid ztbank --no-create-home --shell /usr/sbin/nologin issuer; \
    useradd --system --uid 10001 --gid ztbank --no-create-home --shell /usr/sbin/nologin gateway; \
    useradd --system --uid 10002 --gid ztbank --no-create-home --shell /usr/sbin/nologin transfer-engine; \
    useradd --system --uid 10003 --gid ztbank --no-create-home --shell /usr/sbin/nologin risk; \
    install -d -o 10000 -g 10000 -m 0700 /var/lib/ztbank/issuer /vault/bootstrap; \
    install -d -o 10001 -g 10000 -m 0700 /var/lib/ztbank/gateway; \
    install -d -o 10002 -g 10000 -m 0700 /var/lib/ztbank/transfer-engine; \
    install -d -o 10003 -g 10000 -m 0700 /var/lib/ztbank/risk; \
    install -d -o 10000 -g 10000 -m 0755 /spiffe-workload-api
WORKDIR /app
COPY infra/ infra/
COPY loadtest/ loadtest/
COPY scripts/compose_*.sh scripts/
# services/ is also installed in the venv; the copy keeps `python -m services.*` and the
# relative paths of infra/ (policy, registry, rules) working from /app.
COPY services/ services/

# ---- load: runtime plus locust (compose profile "load") ------------------------------------
FROM base AS load
COPY --from=load-builder /opt/venv /opt/venv
# Mints a teller SVID through the issuer's admin socket (uid 10000, the issuer's volume), then
# runs locust headless against the gateway of ZTBANK_REGISTRY: `python -m loadtest.run`.
USER 10000:10000
ENTRYPOINT ["python", "-m", "loadtest.run"]

# ---- test: the e2e suites against the running stack (compose profile "test", make test-compose)
FROM base AS test
COPY --from=test-builder /opt/venv /opt/venv
COPY pyproject.toml ./
COPY tests/ tests/
# Root: the harness reads every service's volume and drops to each workload's uid to be
# attested as it (services/common/identity/as_uid.py). Only this image runs tests, and only as a
# one-shot job of the compose profile "test".
USER 0:0
ENTRYPOINT ["python", "-m", "pytest"]
CMD ["tests/e2e", "-p", "no:cacheprovider"]

# ---- runtime (default target) --------------------------------------------------------------
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
USER 10000:10000
ENTRYPOINT ["ztbank"]
CMD ["--help"]
