"""Orchestration construct: one function per handler spec, the inlined state machine, and grants."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Match, Template

from lambdas.core.config import load_migration
from stacks.migration_stack import MigrationStack
from stacks.orchestration import ASL, placeholders
from stacks.registry import HANDLERS, Access, HandlerSpec
from tests.infrastructure.conftest import ROOT, Synth


def _functions(result: Synth) -> dict[str, dict[str, Any]]:
    return {
        f["Properties"]["Handler"]: f["Properties"]
        for f in result.resources("AWS::Lambda::Function").values()
        if "Handler" in f["Properties"] and f["Properties"]["Handler"].startswith("lambdas.")
    }


def test_one_python_312_function_per_registered_handler(shipped: Synth) -> None:
    functions = _functions(shipped)
    specs = [spec for spec in HANDLERS if spec.applies_to(shipped.migration.engine.type)]
    assert set(functions) == {spec.handler for spec in specs}
    for spec in specs:
        function = functions[spec.handler]
        assert function["Runtime"] == "python3.12" and function["Architectures"] == ["x86_64"]
        assert function["TracingConfig"] == {"Mode": "Active"}
        assert "KmsKeyArn" in function  # environment encrypted with the migration's key
        assert function["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"] == "zdm"
        assert ("VpcConfig" in function) is spec.in_vpc


def test_state_machine_inlines_the_asl_and_substitutes_every_placeholder(shipped: Synth) -> None:
    machine = next(iter(shipped.resources("AWS::StepFunctions::StateMachine").values()))["Properties"]
    assert "DefinitionString" in machine and "DefinitionS3Location" not in machine
    used = placeholders(ASL.read_text(encoding="utf-8"))
    assert set(machine["DefinitionSubstitutions"]) == set(used)
    for spec in HANDLERS:
        if spec.placeholder in used:
            assert machine["DefinitionSubstitutions"][spec.placeholder]["Fn::GetAtt"][1] == "Arn"
    assert machine["EncryptionConfiguration"]["Type"] == "CUSTOMER_MANAGED_KMS_KEY"
    assert machine["LoggingConfiguration"]["Level"] == "ALL"
    assert machine["LoggingConfiguration"]["IncludeExecutionData"] is False
    assert machine["TracingConfiguration"] == {"Enabled": True}


def test_state_machine_may_invoke_exactly_the_functions_its_definition_names(example: Synth) -> None:
    machine_role = next(k for k, r in example.resources("AWS::IAM::Role").items() if "StateMachineRole" in k)
    policy = next(
        p["Properties"]
        for p in example.resources("AWS::IAM::Policy").values()
        if p["Properties"]["Roles"] == [{"Ref": machine_role}]
    )
    invoke = next(s for s in policy["PolicyDocument"]["Statement"] if s["Action"] == "lambda:InvokeFunction")
    by_handler = {f["Properties"].get("Handler"): k for k, f in example.resources("AWS::Lambda::Function").items()}
    modules = [spec.module for spec in HANDLERS if spec.invoked_by == "state-machine"]
    assert {"preflight", "replication", "validate_chunk", "health_gate", "cutover"} <= set(modules)
    expected = sorted(by_handler[f"lambdas.handlers.{m}.handler"] for m in modules)
    assert sorted(r["Fn::GetAtt"][0] for r in invoke["Resource"]) == expected


def test_the_replication_function_knows_its_dms_tasks(example: Synth) -> None:
    env = _functions(example)["lambdas.handlers.replication.handler"]["Environment"]["Variables"]
    target = json.dumps(env["ZDM_DMS_TARGET"])
    assert "ReplicationTaskIdentifier" in target and "zdm-shop-orders-load-cdc" in target
    assert "zdm-shop-orders-stream" in json.dumps(env["ZDM_DMS_CHANGE_STREAM"])


def test_the_rollback_function_runs_outside_the_vpc_with_a_dead_letter_queue(example: Synth) -> None:
    rollback = _functions(example)["lambdas.handlers.rollback.handler"]
    assert "VpcConfig" not in rollback
    assert "DeadLetterConfig" in rollback
    assert rollback["Environment"]["Variables"]["ZDM_STATE_MACHINE_ARN"]
    example.template.has_resource_properties("AWS::Lambda::EventInvokeConfig", {"MaximumRetryAttempts": 2})


def test_a_new_handler_is_one_registry_line_with_scoped_traffic_access() -> None:
    # Given one more spec (what the cutover work will add) needing the traffic permissions
    extra = (*HANDLERS, HandlerSpec("SequencesOnly", "sequences", (Access.TRAFFIC, Access.ALARMS_READ)))
    app = cdk.App(context={"aws:cdk:bundling-stacks": []})
    stack = MigrationStack(app, "Extra", migration=load_migration(ROOT / "migrations/example.yaml"), handlers=extra)
    template = Template.from_stack(stack)
    # Then its function exists, and may change only the migration's two record names, CNAME only
    template.has_resource_properties("AWS::Lambda::Function", {"FunctionName": "zdm-shop-orders-sequences"})
    template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        {
                            "Action": "route53:ChangeResourceRecordSets",
                            "Effect": "Allow",
                            "Resource": Match.any_value(),
                            "Condition": {
                                "ForAllValues:StringEquals": {
                                    "route53:ChangeResourceRecordSetsNormalizedRecordNames": [
                                        "writer.db.internal",
                                        "reader.db.internal",
                                    ],
                                    "route53:ChangeResourceRecordSetsRecordTypes": ["CNAME"],
                                }
                            },
                        }
                    ]
                )
            }
        },
    )


def test_an_unknown_placeholder_fails_the_synth_naming_it(tmp_path: Path) -> None:
    # Given a definition naming a function no spec provides
    asl = tmp_path / "bad.asl.json"
    asl.write_text(
        json.dumps(
            {"StartAt": "A", "States": {"A": {"Type": "Task", "Resource": "${MissingFunctionArn}", "End": True}}}
        )
    )
    app = cdk.App(context={"aws:cdk:bundling-stacks": []})
    # When synthesized / Then the synth stops and names the placeholder and the fix
    with pytest.raises(Exception, match=r"no substitution for \$\{MissingFunctionArn\}.*add a HandlerSpec"):
        MigrationStack(app, "Bad", migration=load_migration(ROOT / "migrations/example.yaml"), definition_file=asl)


def test_the_chunk_function_outlasts_every_re_check_its_plan_allows(example: Synth) -> None:
    # Given the example's engine (dms: each re-check waits at least 240 s for one-minute CloudWatch datapoints)
    from lambdas.handlers.validate_plan import engine_replication

    replication = engine_replication(example.migration)
    assert replication is not None
    timeout = next(
        int(f["Properties"]["Timeout"])
        for f in example.resources("AWS::Lambda::Function").values()
        if f["Properties"].get("Handler") == "lambdas.handlers.validate_chunk.handler"
    )
    # Then a chunk's waits and a minute to compare fit the function (once: 300 s for up to 5 x 240 s of waits;
    # a timed-out chunk fails the Distributed Map, and the migration rolls back)
    assert replication.attempts * replication.timeout_seconds + 60 <= timeout


def test_a_settings_value_over_4_kb_takes_a_tier_that_holds_it(synth: Callable[..., Synth]) -> None:
    # Given a file naming a dozen alarms (its settings JSON passes 4 KB, a Standard parameter's limit)
    names = [f"shop-orders-service-{i:02d}-p99-latency" for i in range(12)]
    (parameter,) = synth("migrations/example.yaml", alarms={"names": names}).resources("AWS::SSM::Parameter").values()
    props = parameter["Properties"]
    assert len(props["Value"].encode()) > 4096
    # Then the parameter is not Standard (once: the synth passed and the deploy failed)
    assert props.get("Tier") == "Intelligent-Tiering"
    # And the shipped example stays Standard
    (shipped,) = example_parameter(synth)
    assert "Tier" not in shipped["Properties"]


def example_parameter(synth: Callable[..., Synth]) -> list[dict[str, Any]]:
    return list(synth("migrations/example.yaml").resources("AWS::SSM::Parameter").values())


def test_the_cutover_function_drives_the_dms_task_it_waits_for(example: Synth) -> None:
    # Given engine dms: the cutover stops the task once the fence marker reached the target
    cutover = _functions(example)["lambdas.handlers.cutover.handler"]
    target = json.dumps(cutover["Environment"]["Variables"]["ZDM_DMS_TARGET"])
    assert "zdm-shop-orders-load-cdc" in target
    role = cutover["Role"]["Fn::GetAtt"][0]
    statements = [
        s
        for p in example.resources("AWS::IAM::Policy").values()
        if {"Ref": role} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    # Then it may stop, start and describe the task, read its lag, and read both databases' secrets
    assert {"dms:StopReplicationTask", "dms:StartReplicationTask", "dms:DescribeReplicationTasks"} <= actions
    assert {"cloudwatch:GetMetricData", "secretsmanager:GetSecretValue"} <= actions
