"""The Lease lock under the Kubernetes client's elector, without an apiserver: an
unreachable apiserver is a failed attempt (the elector thread must not die, or a leader
would act on a Lease it no longer renews), and a released lock writes nothing more."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock
from urllib3.exceptions import MaxRetryError

from modelpilot.controller.leadership import (
    LEASE_DURATION_S,
    RENEW_DEADLINE_S,
    RETRY_PERIOD_S,
    ElectionLock,
)

pytestmark = pytest.mark.unit


class Unreachable:
    """A CoordinationV1Api whose every call fails as a dead connection does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            raise MaxRetryError(None, "/apis/coordination.k8s.io", "connection refused")

        return call


def _elector(lock: Any) -> leaderelection.LeaderElection:
    config = electionconfig.Config(
        lock, LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S, lambda: None, lambda: None
    )
    return leaderelection.LeaderElection(config)


@pytest.mark.parametrize("lock_class", [LeaseLock, ElectionLock])
def test_an_unreachable_apiserver_is_a_failed_attempt_not_the_electors_end(
    lock_class: type[Any],
) -> None:
    lock = lock_class("lease", "default", "me")
    api = Unreachable()
    lock.api_instance = api
    if lock_class is LeaseLock:  # the client's own lock lets the error end the elector
        with pytest.raises(MaxRetryError):
            _elector(lock).try_acquire_or_renew()
    else:
        assert _elector(lock).try_acquire_or_renew() is False
        assert api.calls == ["read_namespaced_lease"]


def test_a_released_lock_writes_nothing_more() -> None:
    lock = ElectionLock("lease", "default", "me")
    api = Unreachable()
    lock.api_instance = api
    lock.release()  # tries to hand the Lease back: one read, which fails quietly
    assert api.calls == ["read_namespaced_lease"]
    assert lock.create("lease", "default", None) is False
    assert lock.update("lease", "default", None) is False
    assert api.calls == ["read_namespaced_lease"]
