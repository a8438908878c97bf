"""The migration file's cutover and router settings, and the router each one builds. No servers."""

from __future__ import annotations

import copy
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.core.config import MigrationFileError, parse_migration
from lambdas.core.routers import (
    PgbouncerBackend,
    PgbouncerRouter,
    RdsProxyRouter,
    Route53Router,
    RouterError,
    Side,
    router_for,
)

PASSWORD = "s3cr3t-Hunter2"
MINIMAL: dict[str, Any] = {
    "name": "shop-orders",
    "source": {"dsn": f"host=10.0.0.5 port=5432 dbname=orders user=app password={PASSWORD}"},
    "target": {"dsn": "host=10.0.1.5 port=5433 dbname=orders user=app"},
}
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/orders-AbCdEf"


def with_changes(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


def problems_for(data: dict[str, Any]) -> list[str]:
    with pytest.raises(MigrationFileError) as caught:
        parse_migration(data, "test.yaml")
    return caught.value.problems


def test_cutover_defaults() -> None:
    cutover = parse_migration(copy.deepcopy(MINIMAL)).cutover
    assert cutover.fence_grace_seconds == 1.0
    assert cutover.terminate_long_transactions is True
    assert cutover.fence_timeout_seconds == 5.0


def test_the_grace_must_fit_inside_the_fence_timeout() -> None:
    data = with_changes(cutover={"fence_timeout_seconds": 2, "fence_grace_seconds": 2})
    assert problems_for(data) == [
        "cutover: fence_grace_seconds (2) must be below fence_timeout_seconds (2): the grace is part of the time "
        "the fence may take"
    ]


@pytest.mark.parametrize(("hours", "seconds"), [(24, 86_400), (0, 0), (0.5, 1800), (0.1, 360), (0.0001, 1)])
def test_the_rollback_window_is_waited_in_whole_seconds_rounded_up(hours: float, seconds: int) -> None:
    cutover = parse_migration(with_changes(cutover={"rollback_window_hours": hours})).cutover
    assert cutover.rollback_window_seconds == seconds


def test_a_rollback_window_longer_than_an_execution_can_wait_is_refused() -> None:
    assert problems_for(with_changes(cutover={"rollback_window_hours": 9000})) == [
        "cutover.rollback_window_hours: 9000 is too large; use 8760 or less"
    ]


def test_a_pgbouncer_backend_with_a_password_is_refused_and_the_password_not_shown() -> None:
    data = with_changes(router={"pgbouncer": {"source_backend": f"host=db dbname=orders password={PASSWORD}"}})
    problems = problems_for(data)
    assert len(problems) == 1 and problems[0].startswith(
        "router.pgbouncer.source_backend: a pgbouncer backend must not"
    )
    assert PASSWORD not in " ".join(problems)


def test_a_pgbouncer_backend_needs_host_and_dbname() -> None:
    data = with_changes(router={"pgbouncer": {"target_backend": "port=5432"}})
    assert problems_for(data) == [
        "router.pgbouncer.target_backend: expected 'host=... port=... dbname=...' (keys host, port, dbname, user); "
        "got keys ['port']"
    ]


def test_the_pgbouncer_router_takes_backends_from_the_endpoints_without_credentials(tmp_path: Any) -> None:
    config = tmp_path / "pgbouncer.ini"
    data = with_changes(
        router={
            "pgbouncer": {
                "admin_dsn": "host=127.0.0.1 port=6432 dbname=pgbouncer user=admin",
                "config_path": str(config),
                "database_alias": "orders",
                "reader_alias": "orders_ro",
            }
        }
    )
    router = router_for(parse_migration(data))
    assert isinstance(router, PgbouncerRouter)
    assert router.aliases == ["orders", "orders_ro"]
    assert router.backend(Side.SOURCE) == PgbouncerBackend("10.0.0.5", 5432, "orders")
    assert router.backend(Side.TARGET) == PgbouncerBackend("10.0.1.5", 5433, "orders")
    # an explicit backend wins (pgbouncer may reach the databases another way than we do)
    data["router"]["pgbouncer"]["target_backend"] = "host=/run/pg16 port=5432 dbname=orders"
    router = router_for(parse_migration(data))
    assert isinstance(router, PgbouncerRouter)
    assert router.backend(Side.TARGET) == PgbouncerBackend("/run/pg16", 5432, "orders")


def test_the_pgbouncer_router_needs_its_admin_console_and_config() -> None:
    with pytest.raises(RouterError, match=r"needs router\.pgbouncer\.admin_dsn and router\.pgbouncer\.config_path"):
        router_for(parse_migration(copy.deepcopy(MINIMAL)))


AWS_ENDPOINTS = {
    "source": {
        "secret_arn": ARN,
        "host": "shop-pg13.cluster-abc.eu-west-1.rds.amazonaws.com",
        "database": "orders",
        "rds_cluster_identifier": "shop-pg13",
    },
    "target": {
        "secret_arn": ARN,
        "host": "shop-pg16.cluster-def.eu-west-1.rds.amazonaws.com",
        "database": "orders",
        "rds_cluster_identifier": "shop-pg16",
    },
}


def test_route53_and_rds_proxy_routers_are_built_from_the_file_and_given_clients() -> None:
    with mock_aws():
        route53 = boto3.client("route53", region_name="us-east-1")
        rds = boto3.client("rds", region_name="eu-west-1")
        dns = parse_migration(
            with_changes(
                **AWS_ENDPOINTS,
                router={
                    "type": "route53",
                    "route53": {"hosted_zone_id": "Z0123456789ABCDEFGHIJ", "zone_name": "db.internal"},
                },
            )
        )
        router = router_for(dns, route53_client=route53)
        assert isinstance(router, Route53Router)
        assert router.writer_name == "writer.db.internal."
        with pytest.raises(RouterError, match="Route53 client"):
            router_for(dns)
        proxy = parse_migration(
            with_changes(**AWS_ENDPOINTS, router={"type": "rds-proxy", "rds_proxy": {"proxy_name": "shop-app"}})
        )
        built = router_for(proxy, rds_client=rds)
        assert isinstance(built, RdsProxyRouter)
        with pytest.raises(RouterError, match="RDS client"):
            router_for(proxy)
        # the proxy registers databases by identifier: an endpoint without one is named
        bare = copy.deepcopy(AWS_ENDPOINTS)
        del bare["target"]["rds_cluster_identifier"]
        missing = parse_migration(with_changes(**bare, router={"type": "rds-proxy", "rds_proxy": {"proxy_name": "x"}}))
        with pytest.raises(RouterError, match=r"target\.rds_cluster_identifier or target\.rds_instance_identifier"):
            router_for(missing, rds_client=rds)
