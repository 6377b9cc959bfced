# The operator image: kopf + the modelpilot package + the measured variant profile.
# Build from the repository root: docker build -f images/operator.Dockerfile -t modelpilot/operator .
ARG BASE=debian:bookworm-20250811-slim

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator operator
COPY services services
# The operator needs only the base dependencies (no serve extras: no models, no Triton).
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir .

FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin modelpilot
COPY --from=build /opt/venv /opt/venv
COPY profiles/cpu.json /app/profiles/cpu.json
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8080
# Stands for the leader Lease and runs the handlers while leading; the chart passes its args.
ENTRYPOINT ["modelpilot-operator"]
CMD ["--all-namespaces", "--listen=0.0.0.0:8080"]
