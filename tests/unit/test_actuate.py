"""The actuator's live pass, with an in-memory cluster: which pods it syncs, what it tells.

The HTTP side (a pod's Triton and admin API) is tested against real processes in
``tests/integration/test_dataplane.py``; here each pod is a small object with the same
``sync`` contract, so the rules around it are checked table-style.
"""

from __future__ import annotations

from typing import Any

import pytest

from modelpilot import contract
from modelpilot.adapters import live
from modelpilot.controller.actuate import Actuator, admin_token
from modelpilot.render import plan
from modelpilot.render.children import CONFIG_HASH, Defaults, Owner, config_hash, service_config
from tests.helpers import spec_of

SPEC = spec_of("full")
PLAN = plan.initial(SPEC)
MD = {
    "metadata": {"name": "full", "namespace": "ns", "uid": "u-1"},
    "status": {"stages": {}},
}
CURRENT = {s: config_hash(service_config(SPEC, s, PLAN[s])) for s in contract.MODEL_STAGES}


class FakeKube:
    def __init__(
        self,
        pods: dict[str, list[tuple[str, str, dict[str, str]]]],
        not_ready: dict[str, list[tuple[str, str, dict[str, str]]]] | None = None,
    ) -> None:
        self.pods, self.not_ready, self.events = pods, not_ready or {}, []  # type: ignore[var-annotated]

    def running_pods(self, namespace: str, labels: dict[str, str]) -> list[Any]:
        stage = labels["app.kubernetes.io/component"]
        return [(*p, True) for p in self.pods.get(stage, [])] + [
            (*p, False) for p in self.not_ready.get(stage, [])
        ]

    def event(self, owner: Any, type_: str, reason: str, message: str) -> None:
        self.events.append((reason, message))


class FakePod:
    """A pod whose settings are a value: ``sync`` corrects them, or fails like HTTP would."""

    def __init__(
        self,
        runs: live.LiveSettings | None,
        error: Exception | None = None,
        missing: dict[str, str] | None = None,
    ) -> None:
        self.runs, self.error, self.synced = runs, error, 0
        self.missing = missing or {}  # model -> Triton's message

    def unavailable(self, models: list[str]) -> dict[str, str]:
        return {m: why for m, why in self.missing.items() if m in models}

    def sync(self, want: live.LiveSettings) -> list[str]:
        self.synced += 1
        if self.error:
            raise self.error
        corrected = [] if self.runs == want else ["batching of x"]
        self.runs = want
        return corrected


class Closer:
    def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    pods: dict[str, FakePod] = {}
    tokens: list[str | None] = []

    def pod_at(ip: str, token: str | None, timeout_s: float = 0) -> FakePod:
        tokens.append(token)
        pod = pods[ip]
        pod.http = pod.writes = Closer()  # type: ignore[attr-defined]
        return pod

    monkeypatch.setattr(live, "pod_at", pod_at)
    return {"pods": pods, "tokens": tokens}


def want(stage: str) -> live.LiveSettings:
    settings = live.LiveSettings.of(service_config(SPEC, stage, PLAN[stage]))
    assert settings is not None
    return settings


def test_pods_of_the_current_template_are_synced_older_ones_are_left_to_the_rollout(
    cluster: dict[str, Any],
) -> None:
    on_plan, off_plan, old = FakePod(want("embedding")), FakePod(None), FakePod(None)
    cluster["pods"].update({"10.0.0.1": on_plan, "10.0.0.2": off_plan, "10.0.0.3": old})
    kube = FakeKube(
        {
            "embedding": [
                ("a", "10.0.0.1", {CONFIG_HASH: CURRENT["embedding"]}),
                ("b", "10.0.0.2", {CONFIG_HASH: CURRENT["embedding"]}),
                ("c", "10.0.0.3", {CONFIG_HASH: "an-older-one"}),
            ]
        }
    )
    actuator = Actuator(kube, Defaults(), admin_key=b"k" * 32)  # type: ignore[arg-type]
    result = actuator.sync_live(MD, SPEC, PLAN)["embedding"]
    assert (on_plan.synced, off_plan.synced, old.synced) == (1, 1, 0)
    assert off_plan.runs == want("embedding")
    assert result.on_plan == 2 and result.rolling == 1
    assert result.message == "1 pod(s) of an older template, rolling out"
    assert [p.pod for p in result.corrected] == ["b"]
    assert kube.events[0] == ("LiveUpdated", "embedding: applied the plan to b: batching of x")
    # the token is the object's own, derived from the operator's key
    owner = Owner("full", "ns", "u-1")
    assert set(cluster["tokens"]) == {admin_token(b"k" * 32, owner)}


@pytest.mark.parametrize(
    ("previous", "warned"),
    [
        (None, True),  # a new cause: one Warning
        ("b: ConnectionError on GET http://b/", False),  # the same cause as last pass: quiet
        ("b: HTTP 403", True),  # a different cause
    ],
)
def test_a_failed_pod_warns_once_per_cause_and_never_stops_the_others(
    cluster: dict[str, Any], previous: str | None, warned: bool
) -> None:
    import requests

    err = requests.ConnectionError(request=requests.Request("GET", "http://b").prepare())
    good, bad = FakePod(None), FakePod(None, error=err)
    cluster["pods"].update({"10.0.0.1": good, "10.0.0.2": bad})
    notes = {CONFIG_HASH: CURRENT["embedding"]}
    kube = FakeKube({"embedding": [("a", "10.0.0.1", notes), ("b", "10.0.0.2", notes)]})
    md = {**MD, "status": {"stages": {"embedding": {"liveMessage": previous}}}}
    result = Actuator(kube, Defaults()).sync_live(md, SPEC, PLAN)["embedding"]  # type: ignore[arg-type]
    assert good.runs == want("embedding") and result.on_plan == 1
    assert result.message == "b: ConnectionError on GET http://b/"
    warnings = [m for r, m in kube.events if r == "LiveUpdateFailed"]
    assert warnings == (["embedding: b: ConnectionError on GET http://b/"] if warned else [])


def test_stages_without_triton_are_not_synced(cluster: dict[str, Any]) -> None:
    kube = FakeKube({s: [] for s in contract.STAGES})
    result = Actuator(kube, Defaults()).sync_live(MD, SPEC, PLAN)  # type: ignore[arg-type]
    assert sorted(result) == sorted(contract.MODEL_STAGES)


def test_load_checks_cover_pods_that_are_not_ready_and_name_the_pod(
    cluster: dict[str, Any],
) -> None:
    """The pod a model keeps from Ready is the one to ask: it is checked, never synced."""
    served = want("embedding").models[0]
    ready = FakePod(want("embedding"))
    stuck = FakePod(None, missing={served: "Request for unknown model"})
    older = FakePod(None, missing={served: "an older template's"})
    cluster["pods"].update({"10.0.0.1": ready, "10.0.0.2": stuck, "10.0.0.3": older})
    notes = {CONFIG_HASH: CURRENT["embedding"]}
    kube = FakeKube(
        {"embedding": [("a", "10.0.0.1", notes)]},
        {"embedding": [("b", "10.0.0.2", notes), ("c", "10.0.0.3", {CONFIG_HASH: "old"})]},
    )
    result = Actuator(kube, Defaults()).sync_live(MD, SPEC, PLAN)["embedding"]  # type: ignore[arg-type]
    assert (ready.synced, stuck.synced, older.synced) == (1, 0, 0)
    assert result.unavailable == {served: "Request for unknown model (pod b)"}
    assert result.on_plan == 1 and result.rolling == 0  # a not-ready older pod is no rollout
