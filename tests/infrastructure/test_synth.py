"""The CDK app synthesizes offline (no credentials, no lookups) for both shipped migration files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from aws_cdk.assertions import Match

from stacks.config import MigrationConfigError
from tests.infrastructure.conftest import Synth, load, synth_migration


def test_example_migration_synthesizes_its_settings_without_secrets(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::SSM::Parameter", {"Name": "/zdm/shop-orders/settings", "Type": "String", "Value": Match.any_value()}
    )
    params = example.resources("AWS::SSM::Parameter")
    value = json.loads(next(iter(params.values()))["Properties"]["Value"])
    assert value["source"]["secret_arn"].startswith("arn:aws:secretsmanager:")
    assert value["source"]["dsn"] is None
    assert "admin_dsn" not in value["router"]["pgbouncer"]


def test_local_dsn_migration_is_refused_for_aws() -> None:
    with pytest.raises(MigrationConfigError, match=r"source\.dsn is for local runs"):
        synth_migration(load("migrations/local.yaml"))


@pytest.mark.parametrize(
    ("path", "stack", "resources"),
    [
        ("migrations/example.yaml", "Zdm-ShopOrders", {"AWS::DMS::ReplicationInstance", "AWS::MSK::Cluster"}),
        (
            "migrations/serverless-proxy.yaml",
            "Zdm-ShopPayments",
            {"AWS::DMS::ReplicationConfig", "AWS::MSK::ServerlessCluster", "AWS::EC2::VPC", "AWS::Route53::HostedZone"},
        ),
    ],
)
def test_each_shipped_file_synthesizes_for_its_account_and_region(
    synth: Callable[..., Synth], path: str, stack: str, resources: set[str]
) -> None:
    # Given a shipped file / When synthesized with no AWS credentials
    result = synth(path)
    # Then the stack is named after the migration, lives where the secrets live, and holds its choices
    assert result.stack.stack_name == stack
    assert (result.stack.account, result.stack.region) == ("123456789012", "eu-west-1")
    kinds = {r["Type"] for r in result.json["Resources"].values()}
    assert resources <= kinds
    # And nothing needed a lookup (a lookup would show as missing context in the manifest)
    manifest = json.loads((Path(result.app.synth().directory) / "manifest.json").read_text())
    assert not manifest.get("missing")


def test_secrets_in_two_regions_are_refused() -> None:
    target = {
        "secret_arn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:shop/orders-pg16-target-GhIjKl",
        "host": "db",
        "database": "orders",
    }
    with pytest.raises(MigrationConfigError, match=r"target\.secret_arn in 123456789012/us-east-1"):
        synth_migration(load("migrations/example.yaml", target=target))


def test_a_pattern_dms_cannot_express_is_refused_with_the_pattern_named() -> None:
    with pytest.raises(MigrationConfigError, match=r"tables\.include pattern 'public\.order\?'"):
        synth_migration(load("migrations/example.yaml", tables={"include": ["public.order?"]}))


def test_a_host_given_as_an_ip_address_without_an_rds_identifier_is_refused_naming_the_field() -> None:
    # Given a target reached by its IP address, with no RDS identifier (so no proxy: the records point at the host)
    target = {
        "secret_arn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/orders-pg16-target-GhIjKl",
        "host": "10.0.2.20",
        "database": "orders",
        "rds_cluster_identifier": None,
    }
    # When the stack is synthesized / Then it is refused: a CNAME cannot point at an address
    with pytest.raises(MigrationConfigError, match=r"target\.host '10\.0\.2\.20' is an IP address"):
        synth_migration(load("migrations/example.yaml", target=target))
