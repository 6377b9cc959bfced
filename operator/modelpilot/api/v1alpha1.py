"""The ModelDeployment API, v1alpha1: the single source of truth for the CRD schema.

Field constraints become OpenAPI constraints; cross-field rules are declared as CEL
(``x-kubernetes-validations``) on the models so the apiserver itself rejects bad objects.
Decimal values are quantity strings (no floats in spec, per the Kubernetes API conventions).
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from kubernetes.utils.quantity import parse_quantity
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.config import JsonDict, JsonValue

from modelpilot import contract

GROUP = "modelpilot.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md",)
STAGES = contract.STAGES

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One ``x-kubernetes-validations`` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def _quantity_field(description: str, rules: list[JsonValue], **kw: Any) -> Any:
    return Field(
        description=description,
        pattern=QUANTITY,
        max_length=32,
        json_schema_extra={"x-kubernetes-validations": rules},
        **kw,
    )


def _in_unit_interval(name: str, *, open_low: bool) -> list[JsonValue]:
    low = "isGreaterThan(quantity('0'))" if open_low else "compareTo(quantity('0')) >= 0"
    interval = "(0, 1]" if open_low else "[0, 1]"
    return [
        cel(
            f"isQuantity(self) && quantity(self).{low} && "
            "quantity(self).compareTo(quantity('1')) <= 0",
            f"{name} must be a quantity in {interval}",
        )
    ]


class _Model(BaseModel):
    """Strict base: unknown fields are an error, names are camelCase on the wire."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


# ---------------------------------------------------------------------------------- spec


class OptimizerMode(StrEnum):
    AUTO = "Auto"
    RECOMMEND = "Recommend"
    OFF = "Off"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    DISTILLED = "distilled"


class SLO(_Model):
    """What the pipeline must deliver; the optimizer never trades these away."""

    latency_p95_ms: int = Field(
        alias="latencyP95Ms",
        gt=0,
        le=600_000,
        description="End-to-end query latency target: the 95th percentile, in milliseconds.",
    )
    min_quality: str = _quantity_field(
        "Floor on a variant's quality, a quantity in [0, 1]; 1 is the reference variant. "
        "Variants below it are never served.",
        _in_unit_interval("minQuality", open_low=False),
        alias="minQuality",
    )
    max_cost_per_hour: str | None = _quantity_field(
        "Optional budget: the most the pipeline may cost per hour, as the sum over the "
        "embedding and inference replicas of their variant's cost (relative cost per "
        "replica-hour). The optimizer moves to cheaper variants, then fewer replicas, before "
        "it breaks the budget, and sets SLOMet=False/BudgetLimited when it does.",
        [
            cel(
                "isQuantity(self) && quantity(self).compareTo(quantity('0')) >= 0",
                "maxCostPerHour must be a quantity >= 0",
            )
        ],
        alias="maxCostPerHour",
        default=None,
    )

    @property
    def min_quality_value(self) -> Decimal:
        return Decimal(parse_quantity(self.min_quality))

    @property
    def max_cost_per_hour_value(self) -> Decimal | None:
        if self.max_cost_per_hour is None:
            return None
        return Decimal(parse_quantity(self.max_cost_per_hour))


class Verification(_Model):
    """The gate every optimizer-chosen variant switch passes in Auto mode: the candidate
    first gets a sample of live requests mirrored to it (shadow traffic), and is promoted
    only if its outputs agree with the serving variant's and its latency fits the stage's
    budget; otherwise it is rejected, the reason recorded, and not tried again for
    ``retryAfterSeconds``."""

    enabled: bool = Field(default=True, description="Whether variant switches are verified.")
    sample_ratio: str = _quantity_field(
        "Share of live requests mirrored to the candidate, in (0, 1].",
        _in_unit_interval("sampleRatio", open_low=True),
        alias="sampleRatio",
        default="0.1",
    )
    min_agreement: str | None = _quantity_field(
        "Mean agreement with the serving variant the candidate must reach on shadow traffic, "
        "in (0, 1], by the stage's quality metric: the neighbour recall@10 of its embeddings "
        "over recent mirrored texts, or the overlap of its re-ranked top 3. Default: "
        "slo.minQuality (when the reference serves, the agreement is the candidate's quality).",
        _in_unit_interval("minAgreement", open_low=True),
        alias="minAgreement",
        default=None,
    )
    min_samples: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        alias="minSamples",
        description="Mirrored outputs needed before a verdict.",
    )
    timeout_seconds: int = Field(
        default=600,
        ge=30,
        le=86_400,
        alias="timeoutSeconds",
        description="A candidate without minSamples by then is rejected (too little traffic).",
    )
    retry_after_seconds: int = Field(
        default=3600,
        ge=0,
        le=7 * 86_400,
        alias="retryAfterSeconds",
        description="How long a rejected candidate is not tried again.",
    )

    @property
    def sample_ratio_value(self) -> float:
        return float(parse_quantity(self.sample_ratio))

    @property
    def min_agreement_value(self) -> float | None:
        return None if self.min_agreement is None else float(parse_quantity(self.min_agreement))


class OptimizerSettings(_Model):
    """How the self-optimizing loop acts."""

    mode: OptimizerMode = Field(
        default=OptimizerMode.AUTO,
        description="Auto applies decisions; Recommend writes status.recommendations only; "
        "Off leaves every stage at its starting point.",
    )
    interval_seconds: int = Field(
        default=30,
        ge=5,
        le=3600,
        alias="intervalSeconds",
        description="Seconds between two optimizer decisions.",
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        alias="scaleDownStabilizationSeconds",
        description="A stage scales down only to the highest replica count recommended "
        "over this window (as the HPA does), so short dips never shed capacity.",
    )
    max_scale_up_step: int = Field(
        default=4,
        ge=1,
        le=100,
        alias="maxScaleUpStep",
        description="The most replicas one decision adds to a stage.",
    )
    verification: Verification = Field(
        default_factory=Verification,
        description="Shadow-traffic verification of variant switches.",
    )


class PrometheusRef(_Model):
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="Prometheus base URL. It must be one of the endpoints the operator's "
        "installation allows (the chart's prometheus.url and prometheus.allowedUrls); any "
        "other is refused. Unset: the chart's prometheus.url.",
    )


class Replicas(_Model):
    """Bounds the optimizer keeps a stage's replica count within."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.min <= self.max", "replicas.min must be <= replicas.max", ".min")
            ]
        },
    )
    min: int = Field(default=1, ge=0, le=1000, description="Fewest replicas (0 allowed).")
    max: int = Field(default=4, ge=0, le=1000, description="Most replicas.")


# The resource.Quantity schema Kubernetes itself publishes: an int, or a string matching this.
RESOURCE_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": RESOURCE_QUANTITY}),
]


class ResourceRequirements(_Model):
    """The core/v1 ResourceRequirements shape (requests and limits by resource name)."""

    limits: dict[str, Quantity] | None = Field(
        default=None, max_length=32, description="Most of each resource a container may use."
    )
    requests: dict[str, Quantity] | None = Field(
        default=None,
        max_length=32,
        description="Resources reserved for a container when scheduled.",
    )


class KeyRef(_Model):
    name: str = Field(max_length=253, description="Name of the Secret or ConfigMap.")
    key: str = Field(max_length=253, description="Key within it.")
    optional: bool | None = Field(default=None, description="Whether it may be missing.")


class EnvVarSource(_Model):
    secret_key_ref: KeyRef | None = Field(
        default=None, alias="secretKeyRef", description="A key of a Secret."
    )
    config_map_key_ref: KeyRef | None = Field(
        default=None, alias="configMapKeyRef", description="A key of a ConfigMap."
    )


class EnvVar(_Model):
    name: str = Field(
        max_length=256,
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        description="Environment variable name.",
    )
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(
        default=None, alias="valueFrom", description="Value taken from a Secret or ConfigMap."
    )


class Toleration(_Model):
    """The core/v1 Toleration shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.operator) || self.operator != 'Exists' || "
                    "!has(self.value) || self.value == ''",
                    "a toleration with operator Exists has no value",
                )
            ]
        }
    )

    key: str | None = Field(
        default=None, max_length=316, description="Taint key to tolerate; empty means all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists, or Equal (the default) to match value."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value to match.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty means all."
    )
    toleration_seconds: int | None = Field(
        default=None,
        alias="tolerationSeconds",
        description="With NoExecute: how long the pod stays bound after the taint appears.",
    )


class Batching(_Model):
    """Triton dynamic batching: the tuner's upper bounds and its starting point."""

    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=4096,
        alias="maxBatchSize",
        description="Largest batch Triton may form; the tuner searches at or below it.",
    )
    max_queue_delay_microseconds: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        alias="maxQueueDelayMicroseconds",
        description="Longest a request waits for a batch to fill; the tuner searches at or "
        "below it.",
    )
    max_instances: int = Field(
        default=1,
        ge=1,
        le=16,
        alias="maxInstances",
        description="Most model instances (Triton instance_group count) one replica may run "
        "side by side; the tuner searches from 1 up to it, among the counts the variant's "
        "profile measured. 1: one instance, never tuned.",
    )


class Variant(_Model):
    """One way to serve the stage's model, with its quality and its cost."""

    name: str = Field(max_length=63, pattern=DNS_LABEL, description="Unique DNS-label name.")
    model: str = Field(
        max_length=253, min_length=1, description="Model name in the Triton model repository."
    )
    precision: Precision = Field(description="Numeric form of the weights.")
    quality: str = _quantity_field(
        "Declared quality relative to the stage's reference variant, a quantity in (0, 1]. "
        "The optimizer decides on the quality measured against the reference (neighbour "
        "recall@10 for embeddings, top-3 overlap for re-rankers) wherever a profile has it; "
        "a declared figure more than 0.1 from the measured one is reported in status.quality "
        "and a QualityMismatch Warning Event.",
        _in_unit_interval("quality", open_low=True),
    )
    reference: bool = Field(
        default=False,
        description="The variant others are measured against (quality 1 by definition); at "
        "most one per stage. Default: the highest declared quality, the first listed on a tie.",
    )
    cost: str = _quantity_field(
        "Relative cost per replica-hour, a quantity > 0.",
        [
            cel(
                "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                "cost must be a quantity > 0",
            )
        ],
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="Overrides the stage's resources for this variant (e.g. nvidia.com/gpu).",
    )

    @field_validator("quality", "cost")
    @classmethod
    def _parse(cls, v: str) -> str:
        parse_quantity(v)
        return v

    @property
    def quality_value(self) -> Decimal:
        return Decimal(parse_quantity(self.quality))

    @property
    def cost_value(self) -> Decimal:
        return Decimal(parse_quantity(self.cost))


_UNIQUE_NAMES: JsonDict = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}


class Stage(_Model):
    """A microservice of the pipeline, scaled on its own."""

    image: str | None = Field(
        default=None,
        max_length=512,
        description="Container image; the operator's default if unset.",
    )
    replicas: Replicas = Field(
        default_factory=Replicas, description="Replica bounds for the optimizer."
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Container resources (core/v1 ResourceRequirements)."
    )
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=64,
        description="Extra environment variables for the stage's container.",
        json_schema_extra=_UNIQUE_NAMES,
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        alias="nodeSelector",
        max_length=32,
        description="Labels a node must have to run the stage's pods (e.g. a GPU pool).",
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Taints the stage's pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="core/v1 Affinity for the stage's pods, passed on as written; the "
        "apiserver validates it when the stage's Deployment is applied.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class ModelStage(Stage):
    """A stage served by Triton: it has variants and dynamic batching."""

    batching: Batching = Field(
        default_factory=Batching, description="Dynamic batching bounds and starting point."
    )
    variants: list[Variant] = Field(
        min_length=1,
        max_length=16,
        description="Ways to serve this stage; names must be unique.",
        json_schema_extra=_UNIQUE_NAMES
        | {
            "x-kubernetes-validations": [
                cel(
                    "self.filter(v, has(v.reference) && v.reference).size() <= 1",
                    "at most one variant may be the reference",
                )
            ]
        },
    )

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        if len(names) != len(set(names)):
            raise ValueError("variant names must be unique")
        if sum(x.reference for x in v) > 1:
            raise ValueError("at most one variant may be the reference")
        return v

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def reference(self) -> Variant:
        """The variant the others are measured against: the one marked, else the highest
        declared quality (the first listed on a tie)."""
        marked = next((v for v in self.variants if v.reference), None)
        return marked or max(self.variants, key=lambda v: v.quality_value)


class KnobMode(StrEnum):
    """How a gateway knob is set: not used, the user's value, or tuned by the optimizer."""

    OFF = "Off"
    FIXED = "Fixed"
    AUTO = "Auto"


def _not_above(low: str, high: str, message: str) -> JsonDict:
    """The start Auto moves from lies within its bounds (Fixed and Off ignore the bounds)."""
    return cel(
        f"!has(self.mode) || self.mode != 'Auto' || !has(self.{low}) || !has(self.{high}) || "
        f"quantity(self.{low}).compareTo(quantity(self.{high})) <= 0",
        message,
    )


class Routing(_Model):
    """Small/large routing by share: ``smallShare`` of the queries (by a hash of the query
    text, so a repeated query takes the same route) go to smallVariant, the rest to
    largeVariant. No cheap per-query score predicts when the two disagree (README), so the
    share is the knob."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _not_above("minSmallShare", "smallShare", "minSmallShare must be <= smallShare"),
                _not_above("smallShare", "maxSmallShare", "smallShare must be <= maxSmallShare"),
            ]
        }
    )
    mode: KnobMode = Field(
        default=KnobMode.OFF,
        description="Off: every query to the planned variant; Fixed: smallShare to "
        "smallVariant; Auto: the optimizer moves smallShare under slo.minQuality.",
    )
    small_variant: str | None = Field(
        default=None, alias="smallVariant", max_length=63, description="Variant for easy queries."
    )
    large_variant: str | None = Field(
        default=None, alias="largeVariant", max_length=63, description="Variant for hard queries."
    )
    small_share: str = _quantity_field(
        "Share of queries routed to smallVariant, in [0, 1]: Fixed keeps it, Auto starts from it.",
        _in_unit_interval("smallShare", open_low=False),
        alias="smallShare",
        default="0.5",
    )
    min_small_share: str = _quantity_field(
        "Lowest share Auto may set, in [0, 1].",
        _in_unit_interval("minSmallShare", open_low=False),
        alias="minSmallShare",
        default="0",
    )
    max_small_share: str = _quantity_field(
        "Highest share Auto may set, in [0, 1].",
        _in_unit_interval("maxSmallShare", open_low=False),
        alias="maxSmallShare",
        default="1",
    )
    sample_ratio: str = _quantity_field(
        "Share of routed queries also re-ranked by the other variant, off the response path, "
        "to measure how often the two agree, in (0, 1].",
        _in_unit_interval("sampleRatio", open_low=True),
        alias="sampleRatio",
        default="0.1",
    )

    @property
    def start(self) -> float:
        """The share as the user set it: Fixed keeps it, Auto starts from it."""
        return float(parse_quantity(self.small_share))

    @property
    def bounds(self) -> tuple[float, float]:
        low, high = self.min_small_share, self.max_small_share
        return float(parse_quantity(low)), float(parse_quantity(high))

    @property
    def sample_ratio_value(self) -> float:
        return float(parse_quantity(self.sample_ratio))


class SemanticCache(_Model):
    """Answers a query from a cached similar one; a sample of the answers it gives is
    recomputed off the response path and compared."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _not_above(
                    "minSimilarityThreshold",
                    "similarityThreshold",
                    "minSimilarityThreshold must be <= similarityThreshold",
                )
            ]
        }
    )
    mode: KnobMode = Field(
        default=KnobMode.OFF,
        description="Off: no cache; Fixed: answer at similarityThreshold; Auto: the optimizer "
        "moves the threshold so that cached answers agree with fresh ones at slo.minQuality.",
    )
    similarity_threshold: str = _quantity_field(
        "Cosine similarity at or above which a cached answer is reused, in (0, 1]: Fixed keeps "
        "it, Auto starts from it.",
        _in_unit_interval("similarityThreshold", open_low=True),
        alias="similarityThreshold",
        default="0.95",
    )
    min_similarity_threshold: str = _quantity_field(
        "Lowest similarity threshold Auto may set, in (0, 1].",
        _in_unit_interval("minSimilarityThreshold", open_low=True),
        alias="minSimilarityThreshold",
        default="0.8",
    )
    sample_ratio: str = _quantity_field(
        "Share of cache hits recomputed off the response path to check them, in (0, 1].",
        _in_unit_interval("sampleRatio", open_low=True),
        alias="sampleRatio",
        default="0.1",
    )
    max_entries: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        alias="maxEntries",
        description="Most cached answers kept.",
    )
    ttl_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400 * 7,
        alias="ttlSeconds",
        description="Seconds a cached answer stays valid.",
    )

    @property
    def start(self) -> float:
        """The threshold as the user set it: Fixed keeps it, Auto starts from it."""
        return float(parse_quantity(self.similarity_threshold))

    @property
    def bounds(self) -> tuple[float, float]:
        return float(parse_quantity(self.min_similarity_threshold)), 1.0

    @property
    def sample_ratio_value(self) -> float:
        return float(parse_quantity(self.sample_ratio))


class InferenceStage(ModelStage):
    """The query gateway and its Triton answer/re-rank model."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.routing) || self.routing.mode == 'Off' || "
                    "(has(self.routing.smallVariant) && "
                    "self.variants.exists(v, v.name == self.routing.smallVariant))",
                    "routing.smallVariant must name one of inference.variants",
                    ".routing",
                ),
                cel(
                    "!has(self.routing) || self.routing.mode == 'Off' || "
                    "(has(self.routing.largeVariant) && "
                    "self.variants.exists(v, v.name == self.routing.largeVariant))",
                    "routing.largeVariant must name one of inference.variants",
                    ".routing",
                ),
            ]
        },
    )
    routing: Routing = Field(default_factory=Routing, description="Small/large routing.")
    semantic_cache: SemanticCache = Field(
        default_factory=SemanticCache, alias="semanticCache", description="Semantic answer cache."
    )


class Index(_Model):
    dimensions: int = Field(default=384, ge=1, le=65536, description="Vector dimensions.")
    metric: Literal["cosine", "l2", "ip"] = Field(default="cosine", description="Distance metric.")


class Storage(_Model):
    size: str = Field(
        default="1Gi", pattern=QUANTITY, max_length=32, description="Size of the index volume."
    )
    storage_class_name: str | None = Field(
        default=None, alias="storageClassName", max_length=253, description="StorageClass to use."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteOnce",
        alias="accessMode",
        description="ReadWriteMany lets retrieval replicas on different nodes share the "
        "index; it needs a StorageClass that supports it.",
    )


class RetrievalStage(Stage):
    """The ANN index service."""

    index: Index = Field(default_factory=Index, description="Vector index settings.")
    top_k: int = Field(
        default=10,
        ge=1,
        le=1000,
        alias="topK",
        description="Default number of neighbours returned.",
    )
    storage: Storage = Field(default_factory=Storage, description="Persistent index volume.")


def _meets_quality(stage: str) -> JsonDict:
    return cel(
        f"self.{stage}.variants.exists(v, "
        "quantity(v.quality).compareTo(quantity(self.slo.minQuality)) >= 0)",
        f"at least one {stage} variant must have quality >= slo.minQuality",
        f".{stage}.variants",
    )


class ModelDeploymentSpec(_Model):
    """Desired state of a ModelDeployment."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [_meets_quality("embedding"), _meets_quality("inference")]
        },
    )
    slo: SLO = Field(description="Latency, quality and cost targets.")
    optimizer: OptimizerSettings = Field(
        default_factory=OptimizerSettings, description="The self-optimizing loop's settings."
    )
    prometheus: PrometheusRef = Field(
        default_factory=PrometheusRef, description="Where telemetry is read from."
    )
    ingestion: Stage = Field(default_factory=Stage, description="Document ingestion service.")
    embedding: ModelStage = Field(description="Embedding model on Triton.")
    retrieval: RetrievalStage = Field(
        default_factory=RetrievalStage, description="ANN retrieval service."
    )
    inference: InferenceStage = Field(description="Query gateway and answer model on Triton.")

    def stage(self, name: str) -> Stage:
        return getattr(self, name)  # type: ignore[no-any-return]

    def model_stage(self, name: str) -> ModelStage:
        """A stage served by Triton (``contract.MODEL_STAGES``)."""
        stage = self.stage(name)
        if not isinstance(stage, ModelStage):
            raise KeyError(f"{name} is not a model stage")
        return stage


# -------------------------------------------------------------------------------- status


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="One CamelCase word.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str = Field(
        alias="lastTransitionTime", description="When status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", description="Generation this was computed for."
    )


class GatewayMeasurement(_Model):
    """What the gateway's routing or cache did over the optimizer's measurement window."""

    share: float | None = Field(
        default=None,
        description="Routing: the share routed small; cache: the share of lookups with an "
        "entry that hit, expected at the threshold in force.",
    )
    agreement: float | None = Field(
        default=None,
        description="Routing: measured mean top-3 overlap of the small re-ranker with the "
        "large one on sampled queries; cache: expected agreement of hits with fresh answers.",
    )
    quality: float | None = Field(
        default=None, description="Routing: the blended quality expected at the share."
    )
    samples: int = Field(default=0, description="Sampled comparisons behind agreement.")


class UnavailableVariant(_Model):
    """A variant whose Triton model does not load: the optimizer does not use it until
    ``until`` or until the variant's model changes in the spec."""

    variant: str = Field(max_length=63, description="The variant.")
    model: str = Field(max_length=253, description="Its Triton model.")
    reason: str = Field(max_length=1024, description="Triton's message, and the pod.")
    until: int = Field(description="Unix time at which it is tried again.")


class StageStatus(_Model):
    replicas: int = Field(default=0, description="Replicas the operator has set.")
    ready_replicas: int = Field(
        default=0, alias="readyReplicas", description="Replicas observed ready."
    )
    variant: str | None = Field(default=None, description="Serving variant.")
    max_batch_size: int | None = Field(
        default=None, alias="maxBatchSize", description="Triton max batch size in effect."
    )
    max_queue_delay_microseconds: int | None = Field(
        default=None,
        alias="maxQueueDelayMicroseconds",
        description="Triton max queue delay in effect.",
    )
    instances: int | None = Field(
        default=None, description="Triton model instances per replica in effect."
    )
    shadow_variant: str | None = Field(
        default=None,
        alias="shadowVariant",
        description="Candidate variant under verification (receiving shadow traffic).",
    )
    small_share: float | None = Field(
        default=None,
        alias="smallShare",
        description="Gateway: share of queries routed to the small variant.",
    )
    cache_threshold: float | None = Field(
        default=None,
        alias="cacheThreshold",
        description="Gateway: similarity at or above which the semantic cache answers.",
    )
    routing: GatewayMeasurement | None = Field(
        default=None, description="Gateway: the routing as measured (small share, quality)."
    )
    cache: GatewayMeasurement | None = Field(
        default=None, description="Gateway: the cache as measured (hit ratio, hit agreement)."
    )
    unavailable: list[UnavailableVariant] = Field(
        default_factory=list,
        max_length=16,
        description="Variants whose model Triton could not load (load checks).",
    )
    pods_on_plan: int | None = Field(
        default=None,
        alias="podsOnPlan",
        description="Ready pods of the current template whose live settings (batching, "
        "shadow) the last live sync read back and found on the plan or corrected to it; "
        "fewer than readyReplicas while pods of an older template roll out or a pod cannot "
        "be reached (see liveMessage).",
    )
    live_message: str | None = Field(
        default=None,
        alias="liveMessage",
        max_length=1024,
        description="Why pods are off the plan, when some are (the last live sync's errors).",
    )


class DecisionStatus(_Model):
    """``status.lastDecision``: the optimizer's decision (``optimizer.policy.Decision``) as
    explained to users."""

    time: str = Field(description="When the decision was taken (RFC 3339).")
    summary: str = Field(max_length=1024, description="One line: what changed, or hold.")
    reasons: list[str] = Field(default_factory=list, description="Why, one reason a line.")


class Recommendation(_Model):
    stage: str = Field(description="Stage the recommendation is for.")
    replicas: int | None = Field(default=None, description="Recommended replicas.")
    variant: str | None = Field(default=None, description="Recommended variant.")
    max_batch_size: int | None = Field(
        default=None, alias="maxBatchSize", description="Recommended max batch size."
    )
    max_queue_delay_microseconds: int | None = Field(
        default=None, alias="maxQueueDelayMicroseconds", description="Recommended max queue delay."
    )
    instances: int | None = Field(
        default=None, description="Recommended model instances per replica."
    )
    small_share: float | None = Field(
        default=None, alias="smallShare", description="Gateway: recommended small share."
    )
    cache_threshold: float | None = Field(
        default=None, alias="cacheThreshold", description="Gateway: recommended cache threshold."
    )
    reason: str = Field(default="", description="Why.")


class VariantQuality(_Model):
    """A variant's quality as the optimizer holds it to ``slo.minQuality``."""

    stage: str = Field(description="The model stage.")
    variant: str = Field(description="The variant.")
    quality: float = Field(description="The figure the optimizer uses.")
    source: Literal["reference", "measured", "declared"] = Field(
        description="reference (1 by definition), measured against the reference, or the "
        "declared figure where no measurement applies."
    )
    declared: float = Field(description="The spec's figure.")
    measured: float | None = Field(default=None, description="The measured figure, if any.")
    finding: str | None = Field(
        default=None, description="A declared figure the measurement contradicts, or why none."
    )


class RejectedVariant(_Model):
    variant: str = Field(max_length=63, description="The rejected candidate.")
    until: int = Field(description="Unix time until which it is not tried again.")
    reason: str = Field(default="", max_length=1024, description="Why it was rejected.")


class BatchingBackoff(_Model):
    instances: int = Field(ge=1, description="The instance count it applies at.")
    max_batch_size: int = Field(
        ge=1, alias="maxBatchSize", description="The smallest batch size backed off from."
    )
    until: int = Field(description="Unix time until which it and larger ones are not tried.")


class StageHistoryStatus(_Model):
    """What the optimizer remembers about a stage, so a restart resumes, not restarts."""

    scale_down_window: list[list[int]] = Field(
        default_factory=list,
        max_length=1000,
        alias="scaleDownWindow",
        description="[unix time, replicas] pairs that can still be the maximum of the "
        "scale-down stabilization window, oldest first.",
    )
    last_change: int | None = Field(
        default=None, alias="lastChange", description="Unix time of the stage's last change."
    )
    calibration_permille: int = Field(
        default=1000,
        alias="calibrationPermille",
        description="Measured / predicted p95 latency, in thousandths, learnt online.",
    )
    verification_started: int | None = Field(
        default=None,
        alias="verificationStarted",
        description="Unix time the running shadow verification (shadowVariant) started.",
    )
    rejected: list[RejectedVariant] = Field(
        default_factory=list,
        max_length=100,
        description="Candidates that failed verification, not tried again until ``until``.",
    )
    batching_backoff: list[BatchingBackoff] = Field(
        default_factory=list,
        max_length=100,
        alias="batchingBackoff",
        description="Batch sizes the tuner retreated from while the stage measured over its "
        "latency budget, not tried again until ``until``.",
    )
    batch_time_permille: int = Field(
        default=1000,
        alias="batchTimePermille",
        description="Triton's measured batch time over the profile's, in thousandths: the "
        "stage's variants are sized with their profiles scaled by it (1000: as profiled).",
    )


class ModelDeploymentStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", description="The spec generation last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded, MetricsAvailable, SLOMet.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    stages: dict[str, StageStatus] = Field(
        default_factory=dict, description="Per stage: replicas, variant, batching."
    )
    observed_p95_ms: int | None = Field(
        default=None, alias="observedP95Ms", description="Last observed end-to-end p95 (ms)."
    )
    last_decision: DecisionStatus | None = Field(
        default=None, alias="lastDecision", description="The optimizer's last decision."
    )
    recommendations: list[Recommendation] = Field(
        default_factory=list, description="What the optimizer would do, in Recommend mode."
    )
    quality: list[VariantQuality] = Field(
        default_factory=list,
        description="Each model-stage variant's quality: measured, reference or declared.",
    )
    optimizer_state: dict[str, StageHistoryStatus] | None = Field(
        default=None,
        alias="optimizerState",
        description="Per stage, the history the optimizer needs across operator restarts.",
    )
