"""The validation bucket: the Distributed Map's items and results live in S3, never in the state."""

from __future__ import annotations

import json
from typing import Any

from stacks.orchestration import ASL
from stacks.registry import HANDLERS, Access
from tests.infrastructure.conftest import Synth


def _bucket(example: Synth) -> tuple[str, dict[str, Any]]:
    (name, bucket), *others = example.resources("AWS::S3::Bucket").items()
    assert not others
    return name, bucket


def _statements(example: Synth, role_name: str) -> list[dict[str, Any]]:
    return [
        s
        for p in example.resources("AWS::IAM::Policy").values()
        if {"Ref": role_name} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement: dict[str, Any]) -> set[str]:
    actions = statement["Action"]
    return {actions} if isinstance(actions, str) else set(actions)


def _objects_of(statement: dict[str, Any], bucket: str) -> bool:
    return json.dumps(statement["Resource"]).count(bucket) == 1 and "/validation/*" in json.dumps(statement["Resource"])


def test_the_bucket_is_private_encrypted_with_the_data_key_and_outlives_the_stack(example: Synth) -> None:
    name, bucket = _bucket(example)
    props = bucket["Properties"]
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms" and rule["BucketKeyEnabled"]
    assert set(props["PublicAccessBlockConfiguration"].values()) == {True}
    (lifecycle,) = props["LifecycleConfiguration"]["Rules"]
    assert lifecycle["ExpirationInDays"] == example.migration.aws.log_retention_days
    assert bucket["DeletionPolicy"] == "Retain"
    policy = next(
        p for p in example.resources("AWS::S3::BucketPolicy").values() if p["Properties"]["Bucket"] == {"Ref": name}
    )
    denies = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denies)


def test_only_the_validation_functions_get_the_bucket_and_only_its_validation_objects(example: Synth) -> None:
    name, _ = _bucket(example)
    functions = {
        f["Properties"]["Handler"]: (key, f["Properties"])
        for key, f in example.resources("AWS::Lambda::Function").items()
        if f["Properties"].get("Handler", "").startswith("lambdas.")
    }
    for spec in HANDLERS:
        if spec.handler not in functions:
            continue
        _, props = functions[spec.handler]
        env = props["Environment"]["Variables"]
        role = props["Role"]["Fn::GetAtt"][0]
        statements = _statements(example, role)
        s3 = [s for s in statements if any(a.startswith("s3:") for a in _actions(s))]
        if Access.VALIDATION_STORE in spec.access:
            assert env["ZDM_VALIDATION_BUCKET"] == {"Ref": name}
            objects = next(s for s in s3 if _actions(s) == {"s3:GetObject", "s3:PutObject"})
            assert _objects_of(objects, name)
            listing = next(s for s in s3 if _actions(s) == {"s3:ListBucket"})
            assert listing["Condition"] == {"StringLike": {"s3:prefix": ["validation/*"]}}
        else:
            assert "ZDM_VALIDATION_BUCKET" not in env and not s3


def test_the_state_machine_reads_items_writes_map_results_and_runs_child_executions(example: Synth) -> None:
    name, _ = _bucket(example)
    role = next(k for k in example.resources("AWS::IAM::Role") if "StateMachineRole" in k)
    statements = _statements(example, role)
    s3 = next(s for s in statements if "s3:GetObject" in _actions(s))
    assert _actions(s3) == {"s3:GetObject", "s3:PutObject", "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload"}
    assert _objects_of(s3, name)
    start = next(s for s in statements if _actions(s) == {"states:StartExecution"})
    children = next(s for s in statements if _actions(s) == {"states:DescribeExecution", "states:StopExecution"})
    machine = next(iter(example.resources("AWS::StepFunctions::StateMachine").values()))["Properties"]
    assert machine["DefinitionSubstitutions"]["ValidationBucketName"] == {"Ref": name}
    assert "stateMachine:zdm-" in json.dumps(start["Resource"])
    assert ":execution:zdm-shop-orders/*" in json.dumps(children["Resource"])


def test_the_map_reads_the_stored_chunk_list_and_never_collects_results_in_the_state() -> None:
    chunks = json.loads(ASL.read_text())["States"]["ValidateChunks"]
    assert "ItemsPath" not in chunks
    assert chunks["ItemReader"]["Resource"] == "arn:aws:states:::s3:getObject"
    assert chunks["ItemReader"]["ReaderConfig"] == {"InputType": "JSON"}
    assert chunks["ItemReader"]["Parameters"] == {
        "Bucket.$": "$.validation.plan.items.bucket",
        "Key.$": "$.validation.plan.items.key",
    }
    assert chunks["ItemSelector"]["results.$"] == "$.validation.plan.items"
    assert chunks["ResultWriter"]["Parameters"]["Bucket"] == "${ValidationBucketName}"
    assert chunks["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    summary = json.loads(ASL.read_text())["States"]["ValidateSummary"]["Parameters"]["Payload"]
    assert summary == {"plan.$": "$.validation.plan"}


def test_under_engine_dms_the_chunk_function_reads_dms_latency_and_cannot_drive_the_task(example: Synth) -> None:
    # Given the example file (engine dms): the chunk function re-checks once DMS applied (DmsEngine.catch_up)
    assert example.migration.engine.type == "dms"
    props = next(
        f["Properties"]
        for f in example.resources("AWS::Lambda::Function").values()
        if f["Properties"].get("Handler") == "lambdas.handlers.validate_chunk.handler"
    )
    assert "ZDM_DMS_TARGET" in props["Environment"]["Variables"]
    actions = {a for s in _statements(example, props["Role"]["Fn::GetAtt"][0]) for a in _actions(s)}
    assert "cloudwatch:GetMetricData" in actions
    assert not {a for a in actions if a.startswith("dms:")}
