# nanwatch service image: gRPC API on 50051, Prometheus /metrics on 9400, no torch.
# Build: docker build -t nanwatch:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md requirements-lock.txt ./
COPY nanwatch ./nanwatch
COPY client ./client
COPY service ./service
COPY deploy/docker/install-service.sh /usr/local/bin/install-service.sh
RUN install-service.sh /opt/nanwatch /src

FROM ${PYTHON_IMAGE}
# tini runs as PID 1: it forwards SIGTERM to the service and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 nanwatch \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nanwatch \
    && mkdir /data \
    && chown 10001:10001 /data
COPY --from=build /opt/nanwatch /opt/nanwatch
ENV PATH=/opt/nanwatch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The SQLite store (with its WAL files) lives in /data; mount a volume there,
# because the chart runs the container with a read-only root filesystem.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 50051 9400
# On SIGTERM the service sets its health to NOT_SERVING and drains open calls
# for --grace-seconds before it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "nanwatch"]
CMD ["serve", "--host", "0.0.0.0", "--grpc-port", "50051", "--metrics-port", "9400", "--db", "/data/nanwatch.db"]
