"""The RDS Proxy router against moto's RDS: the proxy's target group is retargeted, its endpoint kept.

moto 5.2.5 implements CreateDBProxy, RegisterDBProxyTargets, DeregisterDBProxyTargets and
DescribeDBProxyTargets (a new target reports REGISTERING once, then AVAILABLE), so no
Stubber is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.core.routers.base import NoHold, RouterError, RouterState, Side, TrafficRouter
from lambdas.core.routers.rds_proxy import ProxyTarget, RdsProxyRouter, registered_targets, target_available


@pytest.fixture
def rds() -> Iterator[Any]:
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="eu-west-1")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"eu-west-1{z}")["Subnet"][
                "SubnetId"
            ]
            for i, z in ((1, "a"), (2, "b"))
        ]
        client = boto3.client("rds", region_name="eu-west-1")
        for cluster in ("shop-pg13", "shop-pg16"):
            client.create_db_cluster(
                DBClusterIdentifier=cluster,
                Engine="aurora-postgresql",
                MasterUsername="zdm",
                MasterUserPassword="not-a-real-password",
            )
        client.create_db_proxy(
            DBProxyName="shop-app",
            EngineFamily="POSTGRESQL",
            Auth=[{"SecretArn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop-AbCdEf"}],
            RoleArn="arn:aws:iam::123456789012:role/shop-proxy",
            VpcSubnetIds=subnets,
        )
        client.register_db_proxy_targets(DBProxyName="shop-app", DBClusterIdentifiers=["shop-pg13"])
        yield client


def make_router(client: Any, **kwargs: Any) -> RdsProxyRouter:
    return RdsProxyRouter(
        client,
        proxy_name="shop-app",
        source=ProxyTarget("shop-pg13", "cluster"),
        target=ProxyTarget("shop-pg16", "cluster"),
        poll_interval=0,
        **kwargs,
    )


def endpoint(client: Any) -> str:
    return str(client.describe_db_proxies(DBProxyName="shop-app")["DBProxies"][0]["Endpoint"])


def test_the_writer_switch_retargets_the_proxy_and_keeps_its_endpoint(rds: Any) -> None:
    router = make_router(rds)
    before = endpoint(rds)
    # Given the proxy in front of the source
    assert router.state() == RouterState(Side.SOURCE, 0, False)
    # When the writer switches to the target
    router.switch_writer(Side.TARGET)
    # Then the target group holds the target only, available, and the endpoint did not change
    targets = rds.describe_db_proxy_targets(DBProxyName="shop-app")["Targets"]
    assert registered_targets(targets) == {ProxyTarget("shop-pg16", "cluster")}
    assert target_available(targets, ProxyTarget("shop-pg16", "cluster"))
    assert endpoint(rds) == before
    assert router.state().writer is Side.TARGET
    # And switching again changes nothing; switching back restores the source
    router.switch_writer(Side.TARGET)
    assert registered_targets(rds.describe_db_proxy_targets(DBProxyName="shop-app")["Targets"]) == {
        ProxyTarget("shop-pg16", "cluster")
    }
    router.switch_writer(Side.SOURCE)
    assert router.state().writer is Side.SOURCE and endpoint(rds) == before


def test_a_switch_interrupted_between_deregister_and_register_completes_when_repeated(rds: Any) -> None:
    # Given a target group left empty (a crash after the deregistration)
    rds.deregister_db_proxy_targets(DBProxyName="shop-app", DBClusterIdentifiers=["shop-pg13"])
    router = make_router(rds)
    assert router.state().writer is None
    # When the switch runs again / Then the target is registered
    router.switch_writer(Side.TARGET)
    assert router.state().writer is Side.TARGET


class Registering:
    """Moto's client, reporting every target as `state` for the first `polls` descriptions
    (moto's own REGISTERING is already used up by RegisterDBProxyTargets' answer)."""

    def __init__(self, client: Any, state: str, polls: int) -> None:
        self._client = client
        self._state = state
        self.polls = polls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def describe_db_proxy_targets(self, **kwargs: Any) -> dict[str, Any]:
        page: dict[str, Any] = self._client.describe_db_proxy_targets(**kwargs)
        if self.polls <= 0:
            return page
        self.polls -= 1
        return {"Targets": [{**t, "TargetHealth": {"State": self._state}} for t in page["Targets"]]}


def test_waits_until_the_new_target_is_available_or_gives_up(rds: Any) -> None:
    # Given a proxy that reports the new target REGISTERING for a while
    sleeps: list[float] = []
    slow = Registering(rds, "REGISTERING", polls=4)
    router = RdsProxyRouter(
        slow,
        proxy_name="shop-app",
        source=ProxyTarget("shop-pg13", "cluster"),
        target=ProxyTarget("shop-pg16", "cluster"),
        poll_interval=5,
        sleep=sleeps.append,
    )
    # When the writer switches / Then it returns only once the target is AVAILABLE
    router.switch_writer(Side.TARGET)
    assert sleeps == [5, 5, 5]  # the first description finds what to deregister
    # And a target that never becomes available makes it give up with a reason
    now = [0.0]

    def tick(seconds: float) -> None:
        now[0] += 60

    stuck = RdsProxyRouter(
        Registering(rds, "UNAVAILABLE", polls=1000),
        proxy_name="shop-app",
        source=ProxyTarget("shop-pg13", "cluster"),
        target=ProxyTarget("shop-pg16", "cluster"),
        registration_timeout=120,
        clock=lambda: now[0],
        sleep=tick,
    )
    with pytest.raises(RouterError, match="not AVAILABLE after 120s"):
        stuck.switch_writer(Side.SOURCE)


class Reads(TrafficRouter):
    """Stands for the router reads shift through (weighted records)."""

    name = "reads"

    def __init__(self) -> None:
        self.weight = 0

    def set_read_weight(self, target_percent: int) -> None:
        self.weight = target_percent

    def begin_hold(self) -> NoHold:
        return NoHold()

    def switch_writer(self, side: Side) -> None:
        raise AssertionError("the read router never moves the writer")

    def release(self) -> None:
        return None

    def state(self) -> RouterState:
        return RouterState(None, self.weight, False)


def test_reads_follow_the_writer_or_shift_through_another_router(rds: Any) -> None:
    alone = make_router(rds)
    # Without a read router, reads go where the writer goes: 0 and 100 only
    alone.set_read_weight(0)
    alone.set_read_weight(100)
    with pytest.raises(RouterError, match="cannot be split by percentage"):
        alone.set_read_weight(25)
    # With one, read steps go to it and the proxy is untouched
    reads = Reads()
    shifted = make_router(rds, read_router=reads)
    shifted.set_read_weight(25)
    assert reads.weight == 25 and shifted.state() == RouterState(Side.SOURCE, 25, False)
    # And the proxy cannot hold clients: the database fence alone refuses writes
    assert shifted.begin_hold().done() and not shifted.holds_clients


def test_instances_are_registered_as_instances(rds: Any) -> None:
    router = RdsProxyRouter(
        rds,
        proxy_name="shop-app",
        source=ProxyTarget("shop-pg13", "cluster"),
        target=ProxyTarget("payments-pg16", "instance"),
        poll_interval=0,
    )
    router.switch_writer(Side.TARGET)
    targets = rds.describe_db_proxy_targets(DBProxyName="shop-app")["Targets"]
    assert [(t["RdsResourceId"], t["Type"]) for t in targets] == [("payments-pg16", "RDS_INSTANCE")]
    assert router.state().writer is Side.TARGET
