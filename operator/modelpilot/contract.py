"""The contract between the operator and the data plane, defined once for both sides.

The operator renders pods, ConfigMaps and Services from these names and reads telemetry and
live settings through them; the services (``modelpilot_services``) listen, parse their
config and export metrics by the same constants. A change here changes both sides together,
and a change to one side alone breaks a test.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STAGES = ("ingestion", "embedding", "retrieval", "inference")
MODEL_STAGES = ("embedding", "inference")  # stages with a Triton sidecar
QUERY_PATH = ("embedding", "retrieval", "inference")  # the stages a query passes, in order
# How a model stage's quality is measured: what `make profile` measures against the reference
# variant, the optimizer holds to slo.minQuality, and a verification's shadow traffic
# measures between the candidate and the serving variant.
QUALITY_METRICS = {"embedding": "recall@10", "inference": "top3-overlap"}

# --- ports: each stage's API (in its Service), the admin API (never in a Service), Triton's
SERVICE_PORTS = {"ingestion": 8081, "embedding": 8082, "retrieval": 8083, "inference": 8084}
ADMIN_PORT = 9081
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}

# --- environment of the service containers (the operator sets the admin port and token on
# the model stages' and the config path on Triton; the others have these defaults)
ENV_PORT = "PORT"
ENV_ADMIN_PORT = "MODELPILOT_ADMIN_PORT"
ENV_ADMIN_TOKEN = "MODELPILOT_ADMIN_TOKEN"
ENV_SERVICE_CONFIG = "MODELPILOT_SERVICE_CONFIG"
ENV_TRITON_URL = "MODELPILOT_TRITON_URL"


def stage_url_env(stage: str) -> str:
    """The variable that carries a stage's base URL to the services that call it."""
    return f"MODELPILOT_{stage.upper()}_URL"


# --- the admin API: bearer token from a per-ModelDeployment Secret
ADMIN_TOKEN_SECRET_KEY = "token"
ADMIN_SHADOW_PATH = "/v1/admin/shadow"
ADMIN_CONFIG_PATH = "/v1/admin/config"  # the gateway's routing and cache knobs
# Triton's model-control API (load/unload/index) requires this header with the same token
# (tritonserver --http-restricted-api); inference, health, config and stats stay open.
TRITON_ADMIN_HEADER = "modelpilot-admin-token"
TRITON_RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")

# --- files: the ConfigMap mounted into every container of a stage's pod
CONFIG_DIR = "/etc/modelpilot"
SERVICE_CONFIG_FILE = "service.json"

# --- metrics (Prometheus conventions, seconds); every series carries ``stage``
METRIC_REQUESTS = "modelpilot_requests"  # counter {code}
METRIC_REQUEST_DURATION = "modelpilot_request_duration_seconds"  # histogram
METRIC_IN_FLIGHT = "modelpilot_in_flight_requests"  # gauge
METRIC_SERVING_INFO = "modelpilot_serving_info"  # gauge {route, model}
METRIC_QUEUE_DURATION = "modelpilot_queue_duration_seconds"  # summary {model}
METRIC_COMPUTE_DURATION = "modelpilot_compute_duration_seconds"  # summary {model}: per batch
METRIC_BATCH_SIZE = "modelpilot_batch_size"  # histogram {model}
METRIC_MODEL_INFERENCES = "modelpilot_model_inferences"  # counter {model}
METRIC_MODEL_REQUESTS = "modelpilot_model_requests"  # counter {model}
METRIC_QUERY_DURATION = "modelpilot_query_duration_seconds"  # histogram (gateway)
# Arrivals counted per whole second, for their burstiness (index of dispersion):
METRIC_ARRIVAL_SECONDS = "modelpilot_arrival_seconds"  # counter: whole seconds counted
METRIC_ARRIVALS = "modelpilot_arrivals"  # counter: requests that arrived in those seconds
METRIC_ARRIVALS_SQUARED = "modelpilot_arrivals_squared"  # counter: sum of each second's count^2
METRIC_CACHE_REQUESTS = "modelpilot_cache_requests"  # counter {result: hit|miss}
METRIC_ROUTED_REQUESTS = "modelpilot_routed_requests"  # counter {route: small|large}
METRIC_SHADOW_AGREEMENT = "modelpilot_shadow_agreement"  # histogram {model} 0..1
METRIC_SHADOW_DURATION = "modelpilot_shadow_duration_seconds"  # histogram {model}
METRIC_SHADOW_ERRORS = "modelpilot_shadow_errors"  # counter {model}
# routing and cache checks (summaries: _sum / _count = mean agreement, top-3 overlap)
METRIC_ROUTING_AGREEMENT = "modelpilot_routing_agreement"  # summary: small vs large
METRIC_CACHE_SIMILARITY = "modelpilot_cache_similarity"  # histogram: nearest cached entry
METRIC_CACHE_AGREEMENT = "modelpilot_cache_agreement"  # summary {band}: cached vs fresh
STAGE_LABEL = "stage"
# The bands a cache lookup's similarity falls in, by upper edge (Prometheus' ``le``): the
# thresholds the optimizer sets are these edges, so every choice is measured.
CACHE_BANDS = tuple(round(0.5 + i / 100, 2) for i in range(1, 51))


def band_of(value: float, bands: tuple[float, ...]) -> str:
    """The label of the band ``value`` falls in: its upper edge."""
    edge = next((b for b in bands if value <= b), bands[-1])
    return f"{edge:g}"


class Shadow(BaseModel):
    """The candidate a model stage mirrors a sample of its traffic to (verification)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    sampleRatio: float = Field(default=0.1, gt=0, le=1)


class ServiceConfig(BaseModel):
    """``service.json``: what the operator tells one stage's containers.

    The fields in :data:`LIVE_FIELDS` are applied to running pods without a restart; every
    other field is part of the pod template's config hash, so changing it rolls the pods.
    """

    # Unknown fields are ignored: a newer operator may write fields an older image of the
    # services does not know yet (the images are versioned apart from the operator).
    model_config = ConfigDict(extra="ignore")
    stage: str
    # model stages: the serving variant and its Triton model, every variant's model by
    # name, the models the sidecar loads at start, and the batching they run with
    variant: str | None = None
    model: str | None = None
    variants: dict[str, str] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=list)
    maxBatchSize: int | None = None
    maxQueueDelayMicroseconds: int | None = None
    instances: int | None = None  # Triton instance_group count of each model it runs
    shadow: Shadow | None = None
    # retrieval
    dimensions: int | None = None
    metric: str | None = None
    topK: int | None = None
    dataDir: str | None = None
    # inference (the gateway)
    routing: dict[str, Any] | None = None
    semanticCache: dict[str, Any] | None = None
    smallShare: float | None = None  # share of queries routed to the small variant
    cacheThreshold: float | None = None  # similarity at or above which the cache answers

    def json_text(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


# Applied live to running pods (Triton's model config, the services' shadow setting, the
# gateway's thresholds); the rest of service.json rolls the pods. render's config hash
# leaves exactly these out.
LIVE_FIELDS = frozenset(
    {
        "maxBatchSize",
        "maxQueueDelayMicroseconds",
        "instances",
        "shadow",
        "smallShare",
        "cacheThreshold",
    }
)
