"""Which variant a model stage serves: every allowed variant sized, the cheapest that fits."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

from modelpilot.api.v1alpha1 import ModelStage, Variant
from modelpilot.optimizer.profiles import Profiles
from modelpilot.optimizer.sizing import Setting, Sizing
from modelpilot.optimizer.tunables import Tunables


class Option(NamedTuple):
    """A variant the stage may serve, sized for the load."""

    cost: float  # per hour, at its sizing's replicas
    variant: Variant
    sizing: Sizing
    quality: float  # as assessed (modelpilot.optimizer.quality)


def variant_options(
    stage: ModelStage,
    profiles: Profiles,
    floor: float,
    size: Callable[..., Sizing],
    excluded: Collection[str] = (),
    prefer: tuple[str, Setting] | None = None,
    quality: Mapping[str, float] | None = None,
) -> list[Option]:
    """Every variant the stage may serve (profiled, ``quality`` at or above ``floor``, not
    ``excluded``), sized by ``size(profile, prefer=...)``. ``prefer`` is (variant, its current
    batching setting), kept for that variant when it is as good. ``quality`` is by variant name (by
    default the declared figures)."""
    out: list[Option] = []
    for v in stage.variants:
        prof = profiles.model(v.model)
        q = quality[v.name] if quality is not None else float(v.quality_value)
        if prof is None or q < floor or v.name in excluded:
            continue
        s = size(prof, prefer=prefer[1] if prefer and prefer[0] == v.name else None)
        out.append(Option(s.replicas * float(v.cost_value), v, s, q))
    return out


def cheapest(options: list[Option]) -> list[Option]:
    """The feasible options, cheapest first (then the higher quality)."""
    return sorted((o for o in options if o.sizing.feasible), key=lambda o: (o.cost, -o.quality))


def choose(
    options: list[Option], serving: str | None, recently_changed: bool, tun: Tunables
) -> tuple[Option, Option | None]:
    """(the option to serve, the serving variant's option if it is allowed): the cheapest
    feasible option, else the least bad one; the serving variant stays while it fits and a
    switch would save less than ``switch_saving`` or come too soon after the last change."""
    current = next((o for o in options if o[1].name == serving), None)
    feasible = cheapest(options)
    pick = (
        feasible[0]
        if feasible
        else max(options, key=lambda o: (o[2].utilisation <= 1, -o[2].p95_ms))
    )
    if (
        current is not None
        and current[2].feasible
        and pick is not current
        and (recently_changed or pick[0] > current[0] * (1 - tun.switch_saving))
    ):
        pick = current
    return pick, current
