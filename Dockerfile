# syntax=docker/dockerfile:1
# authz: the ext_authz gRPC server (:9191) and its admin HTTP (:9192: /healthz, /readyz,
# /metrics). Build from the repository root:
#   docker build -t authz:local .
# Two stages: "build" installs authz and exactly the locked dependencies
# (requirements/runtime.txt, every hash checked; wheels only, no compiler) into a venv and
# writes its CycloneDX SBOM there (/opt/authz/sbom.cdx.json); the final stage gets that
# venv and nothing else from the build.
# The base image is pinned by digest: the multi-platform index of python:3.11-slim-bookworm
# (Python 3.11.16) recorded by Docker's official-images team in
# https://github.com/docker-library/repo-info/blob/33a22f41ac7bf613bc03380b0317536a9a7fb5e8/repos/python/remote/3.11-slim-bookworm.md
# To move it: the index digest of the new tag (docker buildx imagetools inspect TAG).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:
# /opt/authz: the image's venv; /opt/build: the build stage's tools (the build backend
# and the SBOM generator, requirements/build.txt), left behind with this stage.
RUN python -m venv /opt/authz && python -m venv /opt/build
WORKDIR /src
COPY requirements/runtime.txt requirements/build.txt ./requirements/
COPY scripts/install-locked ./scripts/
# The locked sets, every archive checked against the lock's hashes (pip --require-hashes);
# install-locked also puts opentelemetry-proto's files back over the older copy xds-protos
# ships (the OTLP trace exporter needs them), as scripts/install-deps does.
RUN scripts/install-locked /opt/build/bin/python requirements/build.txt \
    && scripts/install-locked /opt/authz/bin/python requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY authz ./authz
# authz itself, built from source by the locked setuptools (no build isolation, so nothing
# unlocked is downloaded; it is pure Python) and installed without dependencies. Then the
# installers leave the venv, and the SBOM lists what stays (reproducible: no serial number,
# no timestamp unless SOURCE_DATE_EPOCH is set; scripts/sbom runs the same command).
RUN /opt/build/bin/python -m pip wheel --no-deps --no-build-isolation --no-binary=authz \
       --wheel-dir /tmp/wheels . \
    && /opt/authz/bin/python -m pip install --no-deps /tmp/wheels/authz-*.whl \
    && /opt/authz/bin/python -m pip uninstall --yes pip setuptools wheel \
    && /opt/build/bin/cyclonedx-py environment --pyproject pyproject.toml --mc-type application \
       --spec-version 1.6 --output-reproducible --output-format JSON \
       --output-file /opt/authz/sbom.cdx.json /opt/authz/bin/python

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="authz" \
      org.opencontainers.image.description="Envoy ext_authz v3 server backed by OPA (SBOM: /opt/authz/sbom.cdx.json)" \
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
