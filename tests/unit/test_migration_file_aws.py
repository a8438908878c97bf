"""The AWS-only parts of the migration file (`aws`, endpoint RDS identifiers, DMS, alarm
thresholds): defaults, the second shipped file, and one exact message per mistake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from lambdas.core.config import MigrationFileError, load_migration, parse_migration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/orders-AbCdEf"
AWS_MINIMAL: dict[str, Any] = {
    "name": "shop-orders",
    "source": {"secret_arn": ARN, "host": "src.internal", "database": "orders"},
    "target": {"secret_arn": ARN, "host": "tgt.internal", "database": "orders"},
}


def problems_for(data: Any) -> list[str]:
    with pytest.raises(MigrationFileError) as caught:
        parse_migration(data, "test.yaml")
    return caught.value.problems


def with_changes(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(AWS_MINIMAL)
    data.update(sections)
    return data


def test_serverless_proxy_yaml_loads_as_dms_serverless_with_the_rds_proxy_router() -> None:
    # Given the second shipped AWS file / When loaded
    migration = load_migration(MIGRATIONS / "serverless-proxy.yaml")
    # Then it asks for DMS Serverless, the rds-proxy router, a new VPC and MSK Serverless
    assert migration.engine.type == "dms" and migration.engine.dms.serverless
    assert (migration.engine.dms.min_capacity_units, migration.engine.dms.max_capacity_units) == (2, 32)
    assert migration.router.type == "rds-proxy" and migration.router.rds_proxy.proxy_name == "shop-payments-app"
    assert migration.aws.network.vpc_id is None
    assert migration.aws.network.availability_zones == ["eu-west-1a", "eu-west-1b"]
    assert migration.aws.streaming.cluster == "serverless" and not migration.aws.streaming.dms_change_stream
    assert migration.alarms.max_retained_wal == 20 * 1024**3
    assert migration.aws.log_retention_days == 365


def test_aws_defaults() -> None:
    # Given only the required keys / When parsed / Then the AWS sections take their documented defaults
    migration = parse_migration(copy.deepcopy(AWS_MINIMAL))
    network = migration.aws.network
    assert (network.vpc_id, network.vpc_cidr, network.subnet_ids, network.availability_zones) == (None, None, [], [])
    assert network.nat_gateways == 1
    streaming = migration.aws.streaming
    assert (streaming.enabled, streaming.cluster, streaming.dms_change_stream, streaming.partitions) == (
        False,
        "serverless",
        False,
        6,
    )
    assert migration.aws.log_retention_days == 90
    dms = migration.engine.dms
    assert (dms.multi_az, dms.min_capacity_units, dms.max_capacity_units, dms.target_table_prep) == (
        True,
        2,
        16,
        "do-nothing",
    )
    assert dms.ca_certificate_arn is None and dms.validation_failure_max == 10_000
    alarms = migration.alarms
    assert (alarms.max_lag_seconds, alarms.max_retained_wal, alarms.target_errors_per_minute) == (
        60.0,
        10 * 1024**3,
        10,
    )
    assert (alarms.error_rate_threshold, alarms.error_rate_statistic, alarms.evaluation_minutes) == (1.0, "Average", 3)


def test_existing_vpc_needs_its_subnets_zones_and_range() -> None:
    data = with_changes(
        aws={"network": {"vpc_id": "vpc-0a1b2c3d4e5f60718", "subnet_ids": ["subnet-0a1b2c3d4e5f60001"]}}
    )
    assert problems_for(data) == [
        "aws.network: with vpc_id give at least 2 'subnet_ids' (private subnets in different zones); "
        "with vpc_id give the zone of each subnet in 'availability_zones', in the same order (1 subnet(s), 0 zone(s)); "
        "with vpc_id give 'vpc_cidr' (the VPC's range: database and proxy rules use it)"
    ]


def test_subnets_without_a_vpc_and_malformed_ids_are_named() -> None:
    data = with_changes(
        aws={"network": {"subnet_ids": ["subnet-0a1b2c3d4e5f60001", "sn-2"], "source_security_group_id": "default"}}
    )
    assert problems_for(data) == [
        "aws.network: subnet id 'sn-2' is not a subnet id (subnet-0123...); "
        "source_security_group_id 'default' is not a security group id (sg-0123...); "
        "'subnet_ids' belong to an existing VPC: give 'vpc_id' too, or leave them out"
    ]


def test_vpc_range_must_be_a_cidr() -> None:
    assert problems_for(with_changes(aws={"network": {"vpc_cidr": "10.0.0.0/8"}})) == [
        "aws.network.vpc_cidr: '10.0.0.0/8': use a prefix from /16 to /24"
    ]
    assert problems_for(with_changes(aws={"network": {"vpc_cidr": "ten"}})) == [
        "aws.network.vpc_cidr: 'ten' is not an IPv4 CIDR block, e.g. '10.80.0.0/16'"
    ]


def test_a_database_range_must_be_a_cidr_and_not_given_with_its_security_group() -> None:
    # A host address with a prefix, a range wider than /8 and a range given beside the group are each named
    assert problems_for(with_changes(aws={"network": {"source_cidr": "10.20.0.7/16"}})) == [
        "aws.network.source_cidr: '10.20.0.7/16' is not an IPv4 CIDR block of the database's addresses"
        " (host bits zero), e.g. '10.20.0.0/16'"
    ]
    assert problems_for(with_changes(aws={"network": {"target_cidr": "0.0.0.0/0"}})) == [
        "aws.network.target_cidr: '0.0.0.0/0' is wider than /8: give the range the database's addresses are in"
    ]
    network = {"target_cidr": "172.16.4.0/24", "target_security_group_id": "sg-0a1b2c3d4e5f60bbb"}
    assert problems_for(with_changes(aws={"network": network})) == [
        "aws.network: give either target_security_group_id (a database the migration reaches by its security group)"
        " or target_cidr (its address range), not both"
    ]


def test_dms_change_stream_needs_a_provisioned_cluster() -> None:
    data = with_changes(aws={"streaming": {"enabled": True, "dms_change_stream": True}})
    assert problems_for(data) == [
        "aws.streaming: dms_change_stream needs 'cluster: provisioned': MSK Serverless accepts only IAM sign-in, "
        "and a DMS Kafka endpoint can sign in only with SASL/SCRAM or TLS"
    ]


def test_dms_capacity_units_are_steps_and_ordered() -> None:
    assert problems_for(with_changes(engine={"dms": {"max_capacity_units": 12}})) == [
        "engine.dms.max_capacity_units: 12 is not a DMS capacity unit step; use one of 1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384"
    ]
    assert problems_for(with_changes(engine={"dms": {"min_capacity_units": 32, "max_capacity_units": 16}})) == [
        "engine.dms: min_capacity_units (32) is above max_capacity_units (16)"
    ]


def test_rds_identifiers_are_for_aws_endpoints_and_one_kind_at_a_time() -> None:
    both = with_changes(source={**AWS_MINIMAL["source"], "rds_cluster_identifier": "a", "rds_instance_identifier": "b"})
    assert problems_for(both) == [
        "source: give 'rds_cluster_identifier' (Aurora) or 'rds_instance_identifier' (RDS instance), not both"
    ]
    local = with_changes(source={"dsn": "host=127.0.0.1", "rds_instance_identifier": "db1"})
    assert problems_for(local) == [
        "source: 'rds_instance_identifier' describe an AWS database; with 'dsn' (local runs) leave them out"
    ]


def test_error_rate_metric_needs_a_namespace_and_log_retention_a_cloudwatch_value() -> None:
    assert problems_for(with_changes(alarms={"error_rate_metric": "ErrorRate"})) == [
        "alarms.error_rate_metric: 'ErrorRate' must be 'Namespace/MetricName' (the namespace may hold '/'), e.g. 'Shop/API/ErrorRate'"
    ]
    problems = problems_for(with_changes(aws={"log_retention_days": 45}))
    assert len(problems) == 1 and problems[0].startswith(
        "aws.log_retention_days: 45 is not allowed; use one of 1, 3, 5"
    )


def test_unknown_key_in_the_aws_section_lists_its_keys() -> None:
    assert problems_for(with_changes(aws={"netwrok": {}})) == [
        "aws.netwrok: unknown key 'netwrok'; did you mean 'network'? allowed keys here: debezium, log_retention_days, network, streaming"
    ]


def test_the_pgbouncer_router_is_refused_for_aws_naming_the_field() -> None:
    # Given an AWS file with the local pgbouncer router (its admin DSN is a secret the stack does not store)
    from stacks.config import MigrationConfigError, deployable_settings

    migration = parse_migration(
        with_changes(
            router={
                "type": "pgbouncer",
                "pgbouncer": {"admin_dsn": "host=pgb port=6432 dbname=pgbouncer user=admin", "config_path": "/p.ini"},
            }
        )
    )
    # When the stack's settings are made / Then it is refused at synth (it once failed at the read shift and
    # again in the rollback, after the copy and the validation)
    with pytest.raises(MigrationConfigError, match=r"router\.type: 'pgbouncer' is for local runs"):
        deployable_settings(migration)
