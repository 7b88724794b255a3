# render-service: render-server in a slim image, as a non-root user.
#
#   docker build -t render-service .
#   docker run --rm -p 50051:50051 render-service            # the embedded default registry
#
# Your own registry and model files: mount them and pass --config (arguments after
# the image name are appended to render-server's; see `render-server --help`):
#
#   docker run --rm -p 50051:50051 \
#     -v "$PWD/models.toml":/etc/render-service/models.toml:ro \
#     -v /srv/models:/models:ro \
#     render-service --config /etc/render-service/models.toml
#
# where models.toml names local directories as `tokenizer = { path = "/models/..." }`
# (see the README's "The model registry"). Hub models are downloaded at start-up
# into $HF_HOME (/var/cache/render-service/huggingface): mount a volume there to keep them.
#
# BASE_IMAGE: any Debian-like image with a python3 (3.11+) that has the venv module
# and useradd. Both stages use it, so the venv's interpreter link stays valid.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/render-service
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY server ./server
# A regular (not editable) install of the server with every version pinned; pip
# compiles the bytecode here, since the runtime user cannot write it.
RUN /opt/render-service/bin/python -m pip install --quiet -c constraints.txt ".[server]" \
 && /opt/render-service/bin/render-server --help >/dev/null

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 render \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/render --create-home \
      --shell /usr/sbin/nologin render \
 && mkdir -p /etc/render-service /models /var/cache/render-service/huggingface \
 && chown -R 10001:10001 /var/cache/render-service
COPY --from=build /opt/render-service /opt/render-service
ENV PATH=/opt/render-service/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/render-service/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/render
# 50051: gRPC (RenderService, grpc.health.v1.Health, reflection).
# 8080: HTTP (/healthz, /readyz, /metrics, JSON renders). 8081: /healthz and /readyz
# alone (--health-port), from a process that renders never slow; probes go there.
EXPOSE 50051 8080 8081
# Readiness from the health port: answered within milliseconds however busy the workers
# are (the gRPC health service is answered by a worker, and refused once
# --max-concurrent-rpcs calls run). Loading the models (hub downloads) can take
# minutes: hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
  CMD ["python", "-m", "render_server.probe", "--url", "http://127.0.0.1:8081/readyz"]
# Workers default to the CPUs the container may use (its cgroup CPU quota).
ENTRYPOINT ["render-server", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8080", "--health-port", "8081"]
