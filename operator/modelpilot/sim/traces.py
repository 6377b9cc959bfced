"""Arrival-rate traces: CSV ``t,rps`` (seconds from 0; a rate holds until the next row) and
seeded built-in generators."""

from __future__ import annotations

import csv
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Trace:
    name: str
    t: npt.NDArray[np.float64]  # row start times, seconds, ascending from 0
    rps: npt.NDArray[np.float64]  # rate from t[i] until t[i+1]
    duration: float

    def rate_at(self, now: float) -> float:
        i = int(np.searchsorted(self.t, now, side="right")) - 1
        return float(self.rps[max(i, 0)])

    def max_rate(self, start: float, end: float) -> float:
        i = max(int(np.searchsorted(self.t, start, side="right")) - 1, 0)
        j = max(int(np.searchsorted(self.t, end, side="right")), i + 1)
        return float(self.rps[i:j].max())

    def _seconds(self, smooth_s: float) -> tuple[npt.NDArray[np.float64], int]:
        """Running sums of the rate at each whole second (``sums[i]``: seconds 0..i-1) and
        the window ``smooth_s`` in whole seconds, at least 1, at most the trace."""
        grid = np.arange(0.0, self.duration, 1.0)
        rates = self.rps[np.maximum(np.searchsorted(self.t, grid, side="right") - 1, 0)]
        k = min(max(int(smooth_s), 1), len(rates))
        return np.concatenate(([0.0], np.cumsum(rates))), k

    def peak_mean(self, smooth_s: float) -> PeakMean:
        """The highest mean rate over any ``smooth_s`` seconds starting in a time range."""
        sums, k = self._seconds(smooth_s)
        # The mean of the next k seconds, or of what is left near the end.
        starts = np.arange(len(sums) - 1)
        ends = np.minimum(starts + k, len(sums) - 1)
        return PeakMean((sums[ends] - sums[starts]) / (ends - starts))

    def past_mean(self, smooth_s: float) -> PastMean:
        """The mean rate over the ``smooth_s`` seconds before each whole second."""
        sums, k = self._seconds(smooth_s)
        ends = np.arange(len(sums) - 1)
        starts = np.maximum(ends - k, 0)
        means = (sums[ends] - sums[starts]) / np.maximum(ends - starts, 1)
        means[0] = sums[1]  # nothing has passed yet at t=0: the first second's rate
        return PastMean(means)

    def arrivals(self, seed: int) -> npt.NDArray[np.float64]:
        """Poisson arrival times: per row, a Poisson count spread uniformly over the row."""
        rng = np.random.default_rng(seed)
        ends = np.append(self.t[1:], self.duration)
        spans = ends - self.t
        counts = rng.poisson(self.rps * spans)
        starts = np.repeat(self.t, counts)
        offsets = rng.random(int(counts.sum())) * np.repeat(spans, counts)
        return np.sort(starts + offsets)


@dataclass(frozen=True)
class PeakMean:
    """``peak(start, end)``: the highest forward mean rate starting in [start, end), at 1 s
    steps: the load a queue feels, without the single-second spikes a raw maximum picks."""

    means: npt.NDArray[np.float64]  # forward mean rate from each whole second

    def __call__(self, start: float, end: float) -> float:
        i = min(max(int(start), 0), len(self.means) - 1)
        j = max(math.ceil(end), i + 1)
        return float(self.means[i:j].max())


@dataclass(frozen=True)
class PastMean:
    """``past(now, _)``: the mean rate over the seconds just before ``now``, exactly: the
    most a policy without foresight can know (no scrape lag, no rate window, no noise)."""

    means: npt.NDArray[np.float64]  # backward mean rate at each whole second

    def __call__(self, start: float, end: float) -> float:
        return float(self.means[min(max(int(start), 0), len(self.means) - 1)])


def load_csv(path: str | Path) -> Trace:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or [n.strip() for n in reader.fieldnames] != ["t", "rps"]:
            raise ValueError(f"{path}: header must be 't,rps'")
        rows = [(float(r["t"]), float(r["rps"])) for r in reader]
    if not rows or rows[0][0] != 0 or any(b[0] <= a[0] for a, b in itertools.pairwise(rows)):
        raise ValueError(f"{path}: t must start at 0 and increase")
    if any(r < 0 for _, r in rows):
        raise ValueError(f"{path}: rps must be >= 0")
    t = np.array([r[0] for r in rows])
    step = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    return Trace(Path(path).stem, t, np.array([r[1] for r in rows]), float(t[-1] + step))


def _make(name: str, seconds: int, fn: Callable[[int], float]) -> Trace:
    t = np.arange(seconds, dtype=float)
    return Trace(name, t, np.array([max(0.0, fn(int(s))) for s in t]), float(seconds))


def diurnal(seconds: int = 4 * 3600, base: float = 20, peak: float = 120, seed: int = 1) -> Trace:
    """One compressed day: a smooth swell from base to peak and back, with 5% noise."""
    rng = random.Random(seed)
    return _make(
        "diurnal",
        seconds,
        lambda s: (
            (base + (peak - base) * 0.5 * (1 - math.cos(2 * math.pi * s / seconds)))
            * (1 + rng.gauss(0, 0.05))
        ),
    )


def bursty(seconds: int = 4 * 3600, base: float = 40, burst: float = 110, seed: int = 2) -> Trace:
    """A steady base with random bursts of 1-5 minutes."""
    rng = random.Random(seed)
    level, until = base, 0

    def fn(s: int) -> float:
        nonlocal level, until
        if s >= until:
            if level == base and rng.random() < 0.5:
                level, until = burst, s + rng.randint(60, 300)
            else:
                level, until = base, s + rng.randint(300, 900)
        return level * (1 + rng.gauss(0, 0.05))

    return _make("bursty", seconds, fn)


def step(seconds: int = 4 * 3600, low: float = 30, high: float = 100, seed: int = 3) -> Trace:
    """Low, then a step up to high for the middle half, then low again."""
    rng = random.Random(seed)
    return _make(
        "step",
        seconds,
        lambda s: (high if seconds / 4 <= s < 3 * seconds / 4 else low) * (1 + rng.gauss(0, 0.03)),
    )


def flash_crowd(
    seconds: int = 4 * 3600, base: float = 25, peak: float = 130, seed: int = 4
) -> Trace:
    """A quiet base, then at one third a 2-minute ramp to peak decaying over 20 minutes."""
    rng = random.Random(seed)
    t0 = seconds // 3

    def fn(s: int) -> float:
        extra = 0.0
        if t0 <= s < t0 + 120:
            extra = (peak - base) * (s - t0) / 120
        elif s >= t0 + 120:
            extra = (peak - base) * math.exp(-(s - t0 - 120) / 1200)
        return (base + extra) * (1 + rng.gauss(0, 0.04))

    return _make("flash-crowd", seconds, fn)


def recurring(
    seconds: int = 4 * 3600, base: float = 20, peak: float = 120, day: int = 3600, seed: int = 5
) -> Trace:
    """A day compressed into ``day`` seconds, repeated: quiet, then at a sixth of the day a
    one-minute ramp to peak, held until two thirds of the day, then a five-minute decline;
    5% noise. What a seasonal forecast should see coming from the second day on."""
    rng = random.Random(seed)
    up, down = day // 6, 2 * day // 3

    def fn(s: int) -> float:
        t = s % day
        if up <= t < up + 60:
            level = base + (peak - base) * (t - up) / 60
        elif up + 60 <= t < down:
            level = peak
        elif down <= t < down + 300:
            level = peak - (peak - base) * (t - down) / 300
        else:
            level = base
        return level * (1 + rng.gauss(0, 0.05))

    return _make("recurring", seconds, fn)


BUILTIN: dict[str, Callable[..., Trace]] = {
    "diurnal": diurnal,
    "bursty": bursty,
    "step": step,
    "flash-crowd": flash_crowd,
    "recurring": recurring,
}


def write_csv(trace: Trace, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "rps"])
        for t, r in zip(trace.t, trace.rps, strict=True):
            w.writerow([f"{t:g}", f"{r:.3f}"])
