"""The migration file's `aws.debezium` section (engine debezium on AWS) and the shipped
migrations/debezium.yaml: defaults and one exact message per mistake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from lambdas.core.config import MigrationFileError, load_migration, parse_migration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/events-AbCdEf"
AWS_MINIMAL: dict[str, Any] = {
    "name": "shop-events",
    "source": {"secret_arn": ARN, "host": "src.internal", "database": "events"},
    "target": {"secret_arn": ARN, "host": "tgt.internal", "database": "events"},
    "engine": {"type": "debezium"},
}


def _with_debezium(**settings: Any) -> dict[str, Any]:
    data = copy.deepcopy(AWS_MINIMAL)
    data["aws"] = {"debezium": settings}
    return data


def _problems(data: Any) -> list[str]:
    with pytest.raises(MigrationFileError) as caught:
        parse_migration(data, "test.yaml")
    return caught.value.problems


def test_debezium_yaml_loads_as_engine_debezium_on_msk_serverless() -> None:
    migration = load_migration(MIGRATIONS / "debezium.yaml")
    assert migration.engine.type == "debezium"
    assert migration.topic_prefix == "shop_events"
    assert migration.aws.streaming.cluster == "serverless"
    assert migration.aws.debezium.connector_mcu_count == 1
    assert migration.aws.debezium.config_provider_zip is None
    assert migration.router.type == "rds-proxy"


def test_defaults() -> None:
    settings = parse_migration(AWS_MINIMAL).aws.debezium
    assert (settings.connector_mcu_count, settings.connector_workers) == (1, 1)
    assert (settings.apply_retry_attempts, settings.sqs_endpoint, settings.config_provider_zip) == (3, True, None)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"connector_mcu_count": 3}, "aws.debezium.connector_mcu_count: 3 is not allowed; use one of 1, 2, 4 or 8"),
        ({"connector_workers": 0}, "aws.debezium.connector_workers: 0 is too small; use 1 or more"),
        ({"connector_workers": 11}, "aws.debezium.connector_workers: 11 is too large; use 10 or less"),
        ({"apply_retry_attempts": -1}, "aws.debezium.apply_retry_attempts: -1 is too small; use 0 or more"),
        (
            {"config_provider_zip": "providers.tar.gz"},
            "aws.debezium.config_provider_zip: 'providers.tar.gz' is not a .zip or .jar file: "
            "give the MSK config providers archive",
        ),
        (
            {"connector_mcus": 2},
            "aws.debezium.connector_mcus: unknown key 'connector_mcus'; did you mean 'connector_mcu_count'? allowed keys here: "
            "apply_retry_attempts, config_provider_zip, connector_mcu_count, connector_workers, sqs_endpoint",
        ),
    ],
)
def test_one_message_per_mistake(settings: dict[str, Any], message: str) -> None:
    assert _problems(_with_debezium(**settings)) == [message]
