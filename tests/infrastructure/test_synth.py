"""The CDK app synthesizes offline for the shipped migration file."""

from __future__ import annotations

import json
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Match, Template

from lambdas.core.config import load_migration
from stacks.config import MigrationConfigError
from stacks.migration_stack import MigrationStack, stack_name_for

ROOT = Path(__file__).resolve().parents[2]


def synth(path: str) -> Template:
    migration = load_migration(ROOT / path)
    app = cdk.App()
    stack = MigrationStack(app, stack_name_for(migration), migration=migration)
    return Template.from_stack(stack)


def test_example_migration_synthesizes_its_settings_without_secrets() -> None:
    template = synth("migrations/example.yaml")
    template.has_resource_properties(
        "AWS::SSM::Parameter", {"Name": "/zdm/shop-orders/settings", "Type": "String", "Value": Match.any_value()}
    )
    params = template.find_resources("AWS::SSM::Parameter")
    value = json.loads(next(iter(params.values()))["Properties"]["Value"])
    assert value["source"]["secret_arn"].startswith("arn:aws:secretsmanager:")
    assert value["source"]["dsn"] is None


def test_local_dsn_migration_is_refused_for_aws() -> None:
    with pytest.raises(MigrationConfigError, match=r"source\.dsn is for local runs"):
        synth("migrations/local.yaml")
