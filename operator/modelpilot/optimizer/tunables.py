"""Every knob of the optimizer's policy, in one object an SRE can read and a test can vary.

(What the telemetry means — its rate windows — is defined with the snapshot, which the
Prometheus adapter and the simulator both fill.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tunables:
    """Policy constants; documented so SREs can reason about every decision."""

    # Sizing.
    target_utilisation: float = 0.75  # safety margin: never plan replicas past this ...
    staffing_beta: float = 1.5  # ... unless the pool is large (square-root staffing)
    slo_headroom: float = 0.85  # share of the SLO the stages may use (rest: network, gateway)
    bursty_dispersion: float = 1.5  # an index of dispersion from this up is named in reasons
    min_stage_share: float = 0.10  # no query-path stage gets less of the budget than this
    # The queue delays (us) the sizing tries, up to the stage's maxQueueDelayMicroseconds.
    queue_delays_us: tuple[int, ...] = (
        0,
        100,
        250,
        500,
        1000,
        2000,
        5000,
        10000,
        20000,
        50000,
        100000,
    )
    # Variant choice and stability.
    quality_margin: float = 0.10  # a declared quality this far from the measured one is reported
    switch_saving: float = 0.15  # a variant switch must save at least this share of cost
    cooldown_intervals: int = 2  # no scale-down or switch within this many intervals of a change
    scale_tolerance: float = 0.1  # a replica change must be more than this share (HPA's)
    # Calibration.
    # Batches measured this many times slower (or its inverse faster) than profiled rescale the
    # stage's profile; closer, the latency calibration below corrects alone.
    batch_time_deadband: float = 1.25
    batch_time_hysteresis: float = 1.1  # a factor within this of the measured ratio stays
    calibration_smoothing: float = 0.3  # EWMA weight (log scale) of the newest ratio
    calibration_bounds: tuple[float, float] = (0.04, 25.0)  # a profile 20x off still fits
    calibration_max_step: float = 3.0  # one update moves the factor at most this many times
    # Factors from this up to 1 scale the predicted latency only (the model's tail is
    # pessimistic); outside, the profile's batch times too (see sizing.calibrated()).
    calibration_latency_floor: float = 0.5
    # Learn only from a stage this long after its last change: a window that mixes settings
    # measures a transient, not a model error.
    calibration_settle_s: int = 60
    # A batch size the tuner retreats from while the stage measures over its budget (the
    # profile's batch curve was wrong for this server) is not tried again, nor any larger
    # one at that instance count, for this long: a tuner that only trusted its model would
    # try it again at the next tick that predicts it fits.
    batching_backoff_s: int = 1800
    # The measured stage clearly has headroom when requests wait in Triton's queue (beyond
    # the batching delay) less than this share of its p95 ...
    headroom_queue_share: float = 0.25
    headroom_p95_share: float = 0.5  # ... or, with no queue time, its p95 under this x budget
    # Telemetry.
    min_metric_age_s: float = 60.0  # metrics older than max(this, 3 intervals) are stale
    # Forecast.
    forecast_lead_s: float = 30.0  # a new replica serves about this long after the decision
    forecast_deadband: float = 0.10  # short/long rate rises below this are noise, not trend
    forecast_max_ratio: float = 1.5  # never size for more than this x the short-window rate
    # A bursty stream's rate is sized this many standard deviations of its excess noise above
    # the measured one (one-sided 95%), and a climb must clear as much on the short window.
    burst_noise_z: float = 1.65
    # A season sizes ahead only when its fit of the last hour errs less than this share of
    # what holding the rate over the horizon does.
    season_trust: float = 0.8
    # Verification (the rules users set are spec.optimizer.verification; these are not).
    max_error_ratio: float = (
        0.01  # a candidate failing more than this share of mirrored calls fails
    )
    # Before judging the pace of the samples: the candidate reaches the pods, their first
    # mirrored calls reach Prometheus (increase() needs two scrapes) and the rate window
    # covers the verification.
    verification_settle_s: int = 60
    mirror_lag_s: int = 30  # of which this before a pod's first mirrored call can show at all
    # Mirrored calls expected by now above which not one sample means the pods do not mirror
    # (a Poisson count with this mean is 0 less than once in 100 times).
    mirror_evidence: float = 5.0
    # The gateway's knobs (small share, cache threshold).
    gateway_min_samples: int = 30  # agreement samples before a knob moves
    share_step: float = 0.05  # the small shares Auto chooses from
    band_prior: float = 10.0  # a band's agreement is shrunk to the pooled mean by this many
    # A knob moves toward more small-routed queries or more cache hits only when the
    # predicted quality clears the floor by this much, and back only when it falls below the
    # floor: a measurement near the floor does not move it back and forth.
    knob_margin: float = 0.01
