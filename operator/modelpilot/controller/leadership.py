"""Leader election on a coordination.k8s.io Lease, with the Kubernetes client's elector.

Of the operator's replicas exactly one acts; the others stand by, healthy and Ready, and
take over when the leader's Lease expires, or at once when the leader hands it back on a
graceful stop. A leader that cannot renew exits rather than act unsure, the way
controller-runtime's managers do: the optimizer's state is in each object's status, so the
next leader resumes it."""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from modelpilot.api.v1alpha1 import GROUP
from modelpilot.controller.metrics import LEADER

log = logging.getLogger(__name__)
# The elector logs every 2 s that someone else holds the Lease; our own lines say what matters.
logging.getLogger("leaderelection").setLevel(logging.WARNING)

# A killed leader's Lease is taken over within LEASE_DURATION_S + 2 * RETRY_PERIOD_S. A
# leader that cannot renew stops first: its last successful renew, then RETRY_PERIOD_S of
# sleep, RENEW_DEADLINE_S of tries and one last call of at most REQUEST_TIMEOUT_S end
# before LEASE_DURATION_S, the earliest a standby may take over.
LEASE_DURATION_S = 10
RENEW_DEADLINE_S = 5
RETRY_PERIOD_S = 2
REQUEST_TIMEOUT_S = 1.5
LEADER_LABEL = f"{GROUP}/leader"


class _Timed:
    """An API object whose every call gives up after ``timeout`` seconds: a hung call must
    not carry a leader past the moment a standby may take its Lease."""

    def __init__(self, api: Any, timeout: float) -> None:
        self.api, self.timeout = api, timeout

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self.api, name), _request_timeout=self.timeout)


class ElectionLock(LeaseLock):  # type: ignore[misc]  # the client is untyped
    """The client's LeaseLock, made safe to run unattended: every call is bounded in time;
    a failed call (the apiserver unreachable, not only an API error) is a failed attempt,
    never the elector's death, and one that is not "no Lease yet" is logged (a Role
    without the Lease would otherwise leave every replica standing by, silently); once
    released it writes nothing more, so that the renew loop cannot take back the Lease
    this replica has just handed over."""

    def __init__(self, name: str, namespace: str, identity: str) -> None:
        super().__init__(name, namespace, identity)
        self.api_instance: Any = _Timed(client.CoordinationV1Api(), REQUEST_TIMEOUT_S)
        self.released = False
        self._last_error: str | None = None

    def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        try:
            found, record = super().get(name, namespace)
        except Exception as e:  # connection errors: try again next period
            found, record = False, ApiException(status=0, reason=repr(e))
        error = None if found or getattr(record, "status", None) == 404 else str(record.reason)
        if error is not None and error != self._last_error:  # once per new error
            log.warning("cannot read the Lease %s/%s: %s", namespace, name, error)
        self._last_error = error
        return found, record

    def create(self, name: str, namespace: str, election_record: Any) -> bool:
        return not self.released and self._attempt(super().create, name, namespace, election_record)

    def update(self, name: str, namespace: str, updated_record: Any) -> bool:
        return not self.released and self._attempt(super().update, name, namespace, updated_record)

    @staticmethod
    def _attempt(call: Any, *args: Any) -> bool:
        try:
            return bool(call(*args))
        except Exception as e:  # a failed write is a failed attempt
            log.warning("Lease write failed: %r", e)
            return False

    def release(self) -> None:
        """Hand the Lease back if this replica holds it: an empty holder lets a standby
        take it at its next try instead of after the Lease expires."""
        self.released = True
        try:
            lease = self.api_instance.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            self.api_instance.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("handed the Lease %s/%s back", self.namespace, self.name)
        except Exception as e:  # it expires by itself anyway
            log.warning("could not hand the Lease back: %r", e)


class Leadership:
    """This replica's candidacy for the Lease ``namespace/name``, as ``identity`` (its pod's
    name: a container restarted in the same pod resumes the Lease at once)."""

    def __init__(
        self, name: str, namespace: str, identity: str, pod: tuple[str, str] | None = None
    ) -> None:
        self.lock = ElectionLock(name, namespace, identity)
        self.pod = pod  # (namespace, name) to label, when running in a pod
        self.leading = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._elect, name="leader-election", daemon=True)

    @property
    def identity(self) -> str:
        return str(self.lock.identity)

    def campaign(self) -> None:
        """Stand for election in the background; :attr:`leading` is set once elected."""
        LEADER.set(0)
        self._label(False)  # a restarted container may carry its previous run's label
        self._thread.start()

    def alive(self) -> bool:
        """Whether the election still runs (a standby that stopped standing is unhealthy)."""
        return self._thread.is_alive()

    def release(self) -> None:
        """On a graceful stop, after the handlers stopped: hand the Lease to a standby."""
        self._stopping = True
        self.lock.release()
        LEADER.set(0)
        if self.leading.is_set():
            self._label(False)

    def _elect(self) -> None:
        config = electionconfig.Config(
            self.lock,
            lease_duration=LEASE_DURATION_S,
            renew_deadline=RENEW_DEADLINE_S,
            retry_period=RETRY_PERIOD_S,
            onstarted_leading=self._started,
            onstopped_leading=lambda: None,
        )
        log.info("standing for the Lease %s/%s as %s", self.lock.namespace, self.lock.name,
                 self.identity)  # fmt: skip
        try:
            leaderelection.LeaderElection(config).run()
        finally:
            # run() returns only when renewing failed; anything else that ends it ends the
            # candidacy too. A leader that may no longer hold the Lease must not act.
            if self.leading.is_set() and not self._stopping:
                log.error("lost the Lease %s/%s: exiting so that a standby takes over",
                          self.lock.namespace, self.lock.name)  # fmt: skip
                logging.shutdown()
                os._exit(1)  # at once: no handler may act on a Lease another may hold

    def _started(self) -> None:
        log.info("leading: acquired the Lease %s/%s as %s", self.lock.namespace, self.lock.name,
                 self.identity)  # fmt: skip
        LEADER.set(1)
        self._label(True)
        self.leading.set()

    def _label(self, leader: bool) -> None:
        if self.pod is None:
            return
        namespace, name = self.pod
        body = {"metadata": {"labels": {LEADER_LABEL: str(leader).lower()}}}
        try:
            client.CoreV1Api().patch_namespaced_pod(name, namespace, body, _request_timeout=5)
        except Exception as e:  # a label is for people; acting goes on
            log.warning("could not label pod %s/%s %s: %r", namespace, name, LEADER_LABEL, e)
