"""The state machine definition: every transition lands on a state, every state is reachable,
every ${...} has a substitution, and every Lambda is reachable from the state machine or the
alarm rule."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stacks.orchestration import placeholders
from stacks.registry import HANDLERS
from tests.infrastructure.conftest import ROOT, Synth

DEFINITIONS = sorted((ROOT / "statemachine").glob("*.asl.json"))
# The provider function of CDK's AwsCustomResource (reads MSK's bootstrap brokers at deploy time):
# CloudFormation invokes it during deployment; nothing at run time does.
DEPLOY_TIME_FUNCTIONS = re.compile(r"^AWS679f53fac002430cb0da5b7982bd2287")


def _transitions(states: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name, state in states.items():
        for key in ("Next", "Default"):
            if key in state:
                yield name, state[key]
        for choice in state.get("Choices", []):
            yield name, choice["Next"]
            for nested in choice.get("And", []) + choice.get("Or", []):
                if "Next" in nested:
                    yield name, nested["Next"]
        for catch in state.get("Catch", []):
            yield name, catch["Next"]


def _nested(states: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parallel branches and Map processors: machines of their own, with their own state names."""
    for name, state in states.items():
        for i, branch in enumerate(state.get("Branches", [])):
            yield f"{name}[{i}]", branch
        for key in ("ItemProcessor", "Iterator"):
            if key in state:
                yield name, state[key]


def _check(machine: dict[str, Any], scope: str = "") -> list[str]:
    states = machine["States"]
    problems: list[str] = []
    for name, inner in _nested(states):
        problems += _check(inner, f"{scope}{name} > ")
    problems += [scope + p for p in _check_scope(machine)]
    return problems


def _check_scope(machine: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    states = machine["States"]
    if machine["StartAt"] not in states:
        problems.append(f"StartAt {machine['StartAt']} is no state")
    edges: dict[str, set[str]] = {name: set() for name in states}
    for source, target in _transitions(states):
        if target not in states:
            problems.append(f"{source} -> {target}: no such state")
        else:
            edges[source].add(target)
    reached = {machine["StartAt"]}
    todo = [machine["StartAt"]]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    problems += [f"{name} is unreachable from {machine['StartAt']}" for name in states if name not in reached]
    for name, state in states.items():
        terminal = state["Type"] in ("Succeed", "Fail") or state.get("End") is True
        if state["Type"] != "Choice" and not terminal and "Next" not in state:
            problems.append(f"{name} has neither Next nor End")
    return problems


@pytest.mark.parametrize("path", DEFINITIONS, ids=[p.name for p in DEFINITIONS])
def test_every_transition_lands_on_a_reachable_state(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    # substituted as CloudFormation will, the definition is JSON
    machine = json.loads(re.sub(r"\$\{([A-Za-z0-9_]+)\}", r"arn:aws:lambda:eu-west-1:123456789012:function:\1", text))
    assert _check(machine) == []


def test_the_checker_catches_a_dangling_and_an_unreachable_state() -> None:
    machine = {
        "StartAt": "A",
        "States": {"A": {"Type": "Task", "Resource": "x", "Next": "Gone"}, "Lonely": {"Type": "Succeed"}},
    }
    assert _check(machine) == ["A -> Gone: no such state", "Lonely is unreachable from A"]


def test_every_placeholder_has_a_substitution(shipped: Synth) -> None:
    machine = next(iter(shipped.resources("AWS::StepFunctions::StateMachine").values()))["Properties"]
    definition = json.dumps(machine["DefinitionString"])
    substitutions = machine["DefinitionSubstitutions"]
    for name in placeholders(definition):
        assert name in substitutions, f"${{{name}}} has no substitution"


def test_every_lambda_is_reachable_from_the_state_machine_or_the_alarm_rule(shipped: Synth) -> None:
    machine = next(iter(shipped.resources("AWS::StepFunctions::StateMachine").values()))["Properties"]
    from_machine = {
        v["Fn::GetAtt"][0]
        for v in machine["DefinitionSubstitutions"].values()
        if isinstance(v, dict) and "Fn::GetAtt" in v
    }
    from_rules = {
        t["Arn"]["Fn::GetAtt"][0]
        for rule in shipped.resources("AWS::Events::Rule").values()
        for t in rule["Properties"]["Targets"]
        if isinstance(t["Arn"], dict) and "Fn::GetAtt" in t["Arn"]
    }
    resources = shipped.resources("AWS::Lambda::Function")
    functions = {k for k in resources if not DEPLOY_TIME_FUNCTIONS.match(k)}
    assert functions, "no functions"
    # Event-source functions (the debezium applier) are invoked by the event source mappings the
    # replication function creates: its ZDM_CHANGE_STREAM names them.
    specs = [s for s in HANDLERS if s.applies_to(shipped.migration.engine.type)]
    by_handler = {resources[k]["Properties"]["Handler"]: k for k in functions}
    replication_env = json.dumps(
        resources[by_handler["lambdas.handlers.replication.handler"]]["Properties"]["Environment"]
    )
    from_mappings = set()
    for spec in specs:
        if spec.invoked_by == "event-source":
            name = resources[by_handler[spec.handler]]["Properties"]["FunctionName"]
            assert f'\\"applier_function\\":\\"{name}\\"' in replication_env, f"{name}: no mapping names it"
            from_mappings.add(by_handler[spec.handler])
    unreachable = functions - from_machine - from_rules - from_mappings
    assert not unreachable, f"functions nothing invokes: {sorted(unreachable)}"
    assert len(functions) == len(specs)
