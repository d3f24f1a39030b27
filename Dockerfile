# syntax=docker/dockerfile:1
# authz: the ext_authz gRPC server (:9191) and its admin HTTP (:9192: /healthz, /readyz,
# /metrics). Build from the repository root:
#   docker build -t authz:local .
# Two stages: "build" installs authz and its dependencies (wheels only, no compiler)
# into a venv; the final stage gets that venv and nothing else from the build.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:
RUN python -m venv /opt/authz
WORKDIR /src
COPY pyproject.toml README.md ./
COPY authz ./authz
# setuptools builds authz itself from source (it is pure Python); every dependency must
# come as a wheel (PIP_ONLY_BINARY), so a missing wheel fails here instead of compiling.
# xds-protos ships an older copy of opentelemetry/proto/*: put opentelemetry-proto's own
# files back over it, or the OTLP trace exporter cannot import (scripts/install-deps too).
RUN /opt/authz/bin/pip install --no-binary=authz . \
    && /opt/authz/bin/pip install --force-reinstall --no-deps \
       "opentelemetry-proto==$(/opt/authz/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
    && /opt/authz/bin/python -c 'from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope' \
    && /opt/authz/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="authz" \
      org.opencontainers.image.description="Envoy ext_authz v3 server backed by OPA" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid authz --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin authz \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/authz
COPY --from=build /opt/authz /opt/authz
COPY --chmod=0755 infra/docker/healthcheck.py /usr/local/bin/authz-healthcheck
# In a container authz listens on every interface; the secrets file is mounted read-only
# at AUTHZ_SECRETS_FILE by the deployment (infra/compose, infra/k8s). Its only writable
# state (audit database, persisted overrides) goes to /var/lib/authz, a volume, so the
# root filesystem can be read-only.
ENV PATH=/opt/authz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUTHZ_GRPC_ADDR=0.0.0.0:9191 \
    AUTHZ_ADMIN_ADDR=0.0.0.0:9192 \
    AUTHZ_AUDIT_DB=/var/lib/authz/audit.db \
    AUTHZ_OVERRIDES_FILE=/var/lib/authz/overrides.json
VOLUME ["/var/lib/authz"]
WORKDIR /var/lib/authz
USER 10001:10001
EXPOSE 9191 9192
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/bin/authz-healthcheck", "/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["authz"]
CMD ["serve"]
