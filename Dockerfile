# tokenwire server and edge (one image; the command picks: `serve` or `edge`), CPU.
# Build: docker build -t tokenwire:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY service ./service
# The client, the `tokenwire` command and the edge: the tokenwire-client distribution.
COPY clients ./clients
# Settings rules, default ports, percentiles: shared by both, shipped by tokenwire-client.
COPY common ./common
# pip byte-compiles what it installs: the runtime's filesystem is read-only and it writes no
# bytecode (PYTHONDONTWRITEBYTECODE), so modules left uncompiled are compiled at every start.
RUN python -m venv /opt/tokenwire \
    && /opt/tokenwire/bin/pip install './clients[edge]' .

FROM python:3.11-slim
ENV PATH=/opt/tokenwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENWIRE_HOST=0.0.0.0 \
    TOKENWIRE_EDGE_HOST=0.0.0.0 \
    TOKENWIRE_MODEL_DIR=/models/tiny-py
RUN groupadd --system --gid 10001 tokenwire \
    && useradd --system --uid 10001 --gid tokenwire --no-create-home tokenwire
COPY --from=build /opt/tokenwire /opt/tokenwire
COPY models/tiny-py /models/tiny-py
USER 10001:10001
EXPOSE 50051 9464 8000
# Kubernetes probes health (grpc.health.v1 and /healthz, /readyz), so no HEALTHCHECK here.
ENTRYPOINT ["tokenwire"]
CMD ["serve"]
