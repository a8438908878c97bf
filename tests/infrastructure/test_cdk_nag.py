"""cdk-nag AwsSolutions (3.x, a validation plugin): no unacknowledged finding; every
acknowledgement carries its reason."""

from __future__ import annotations

from collections.abc import Callable

import aws_cdk as cdk
import pytest
from aws_cdk import aws_sqs as sqs
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct

from tests.infrastructure.conftest import Synth

VARIANTS = [
    ("migrations/example.yaml", {}),
    ("migrations/serverless-proxy.yaml", {}),
    ("migrations/example.yaml", {"engine": {"type": "logical"}, "aws": {"streaming": {"enabled": False}}}),
    (
        "migrations/serverless-proxy.yaml",
        {"router": {"type": "route53", "route53": {"hosted_zone_id": "Z0123456789ABCDEFGHIJ"}}},
    ),
    ("migrations/debezium.yaml", {}),
    # debezium with a provisioned cluster, the DMS change stream beside it, the file's VPC and no SQS endpoint
    (
        "migrations/example.yaml",
        {
            "engine": {"type": "debezium"},
            "aws": {"debezium": {"sqs_endpoint": False, "connector_workers": 2, "connector_mcu_count": 2}},
        },
    ),
]


def _report(scope: IConstruct) -> list[str]:
    report = AwsSolutionsChecks().validate_scope(scope)
    return [f"{v.rule_name}: {r.construct_path}" for v in report.violations for r in v.violating_resources]


@pytest.mark.parametrize(
    ("path", "changes"),
    VARIANTS,
    ids=["example", "serverless-proxy", "logical-no-stream", "serverless-route53", "debezium", "debezium-provisioned"],
)
def test_no_unacknowledged_aws_solutions_finding(
    synth: Callable[..., Synth], path: str, changes: dict[str, object]
) -> None:
    result = synth(path, **changes)
    findings = _report(result.app)
    assert not findings, "\n".join(findings)


def test_every_acknowledgement_has_a_reason(example: Synth, serverless: Synth, debezium: Synth) -> None:
    seen = 0
    for result in (example, serverless, debezium):
        for construct in result.app.node.find_all():
            for entry in construct.node.metadata:
                if entry.type != cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY:
                    continue
                for rule, reason in dict(entry.data).items():
                    seen += 1
                    assert len(str(reason).split()) >= 8, (
                        f"{construct.node.path}: {rule} needs a real reason: {reason!r}"
                    )
    assert seen >= 10


def test_the_checks_do_catch_a_finding() -> None:
    # Given a stack with an unencrypted queue and no DLQ / When checked / Then cdk-nag reports it
    app = cdk.App()
    stack = cdk.Stack(app, "Bare")
    sqs.Queue(stack, "Plain", encryption=sqs.QueueEncryption.UNENCRYPTED)
    assert any("AwsSolutions-SQS" in f for f in _report(app))
