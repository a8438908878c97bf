"""RDS Proxy as the router: the proxy's target group is retargeted; its endpoint never changes.

`switch_writer` deregisters whatever the target group points at (other than the wanted
database) and registers the wanted Aurora cluster or RDS instance, then waits until the
proxy reports it AVAILABLE. A target group holds one database, so there is a short moment
with no target (new connections wait for `ConnectionBorrowTimeout`). Connections the proxy
holds to the old database are closed by it; the old database stays fenced (read-only), so
nothing can be written there through a stale connection.

RDS Proxy cannot weight reads between two databases and cannot hold clients. Reads either
follow the writer (weights 0 and 100 are accepted and change nothing), or are shifted by
another router given as `read_router` (e.g. Route53 weighted records over the two
databases' reader endpoints). `begin_hold` is already done: the database fence alone
refuses writes for its length.

The proxy's auth settings must already hold a secret that works on the target (both
databases are registered with the same proxy in turn): preflight checks that the source's login
works on the target (`preflight.proxy_login_result`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from lambdas.core.routers.base import NoHold, RouterError, RouterState, Side, TrafficRouter, check_weight


class RdsClient(Protocol):
    def describe_db_proxy_targets(self, **kwargs: Any) -> dict[str, Any]: ...

    def register_db_proxy_targets(self, **kwargs: Any) -> dict[str, Any]: ...

    def deregister_db_proxy_targets(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ProxyTarget:
    identifier: str
    kind: Literal["cluster", "instance"]

    def register_args(self) -> dict[str, list[str]]:
        key = "DBClusterIdentifiers" if self.kind == "cluster" else "DBInstanceIdentifiers"
        return {key: [self.identifier]}


def registered_targets(targets: list[dict[str, Any]]) -> set[ProxyTarget]:
    """The databases a target group points at: tracked clusters, and instances outside a cluster."""
    found: set[ProxyTarget] = set()
    for target in targets:
        if target.get("Type") == "TRACKED_CLUSTER":
            found.add(ProxyTarget(target["RdsResourceId"], "cluster"))
        elif target.get("Type") == "RDS_INSTANCE" and not target.get("TrackedClusterId"):
            found.add(ProxyTarget(target["RdsResourceId"], "instance"))
    return found


def target_available(targets: list[dict[str, Any]], wanted: ProxyTarget) -> bool:
    """Whether the proxy reports `wanted` usable: its writer instance (or itself) AVAILABLE."""
    mine = [
        t
        for t in targets
        if (t.get("RdsResourceId") == wanted.identifier and t.get("Type") != "RDS_SERVERLESS_ENDPOINT")
        or (wanted.kind == "cluster" and t.get("TrackedClusterId") == wanted.identifier)
    ]
    healthy = [t for t in mine if "TargetHealth" in t]
    writers = [t for t in healthy if t.get("Role") == "READ_WRITE"]
    judged = writers or healthy
    return bool(judged) and all(t["TargetHealth"].get("State") == "AVAILABLE" for t in judged)


class RdsProxyRouter(TrafficRouter):
    name = "rds-proxy"

    def __init__(
        self,
        client: RdsClient,
        *,
        proxy_name: str,
        source: ProxyTarget,
        target: ProxyTarget,
        target_group: str = "default",
        read_router: TrafficRouter | None = None,
        registration_timeout: float = 300.0,
        poll_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if source == target:
            raise RouterError("the RDS Proxy's source and target databases are the same")
        self._client = client
        self._proxy = proxy_name
        self._group = target_group
        self._targets = {Side.SOURCE: source, Side.TARGET: target}
        self._reads = read_router
        self._timeout = registration_timeout
        self._poll = poll_interval
        self._clock = clock
        self._sleep = sleep

    def _describe(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = []
        params: dict[str, Any] = {"DBProxyName": self._proxy, "TargetGroupName": self._group}
        while True:
            page = self._client.describe_db_proxy_targets(**params)
            targets += page.get("Targets", [])
            if not page.get("Marker"):
                return targets
            params["Marker"] = page["Marker"]

    def set_read_weight(self, target_percent: int) -> None:
        p = check_weight(target_percent)
        if self._reads is not None:
            self._reads.set_read_weight(p)
        elif p not in (0, 100):
            raise RouterError(
                "an RDS Proxy sends every connection to one database, so reads cannot be split by percentage: "
                "give router.route53.hosted_zone_id to shift reads through weighted records, or use "
                "read_shift.steps: [100] (reads then move with the writer)"
            )

    def begin_hold(self) -> NoHold:
        return NoHold()

    def switch_writer(self, side: Side) -> None:
        wanted = self._targets[side]
        current = registered_targets(self._describe())
        for stale in sorted(current - {wanted}, key=lambda t: (t.kind, t.identifier)):
            self._client.deregister_db_proxy_targets(
                DBProxyName=self._proxy, TargetGroupName=self._group, **stale.register_args()
            )
        if wanted not in current:
            self._client.register_db_proxy_targets(
                DBProxyName=self._proxy, TargetGroupName=self._group, **wanted.register_args()
            )
        started = self._clock()
        while not target_available(self._describe(), wanted):
            if self._clock() - started >= self._timeout:
                raise RouterError(
                    f"RDS Proxy {self._proxy} has {wanted.kind} {wanted.identifier} registered but not AVAILABLE after "
                    f"{self._timeout:g}s: check the proxy's secret works on it and its security groups let the proxy in"
                )
            self._sleep(self._poll)

    def release(self) -> None:
        return None

    @property
    def stale_seconds(self) -> float:
        return self._reads.stale_seconds if self._reads is not None else 0.0

    def state(self) -> RouterState:
        current = registered_targets(self._describe())
        writer = None
        for side, target in self._targets.items():
            if current == {target}:
                writer = side
        if self._reads is not None:
            read = self._reads.state().read_weight
        else:
            read = None if writer is None else (100 if writer is Side.TARGET else 0)
        return RouterState(writer, read, holding=False)
