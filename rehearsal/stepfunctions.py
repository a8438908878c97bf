"""Run the real ASL definition locally: moto's Step Functions interpreter, Lambda tasks in-process.

The definition file is the one CDK deploys; `${...}` substitutions are filled the same way
(function ARNs of functions created in the mock, plus named values). Each Lambda task is
routed to the handler function itself, called with the event and a small context, so the
same handler code runs here as on AWS. A handler's exception becomes a Lambda function
error, so Retry and Catch behave as on AWS. Wait states really wait: shorten them through
the execution input (the definition reads its wait times from the input), never by editing
the definition.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any], Any], Any]
REGION = "us-east-1"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class StateMachineError(RuntimeError):
    pass


@dataclass(frozen=True)
class LambdaContext:
    """What handlers read from the Lambda context (Powertools logs these fields)."""

    function_name: str
    aws_request_id: str
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = ""

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


@dataclass
class ExecutionResult:
    status: str  # SUCCEEDED / FAILED / TIMED_OUT / ABORTED
    output: dict[str, Any] | None
    error: str | None
    cause: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def placeholders(definition: str) -> list[str]:
    return sorted(set(_PLACEHOLDER.findall(definition)))


@contextlib.contextmanager
def _routed_lambdas(handlers: Mapping[str, Handler]) -> Iterator[None]:
    """Route moto's Lambda invocations to in-process handlers (restored on exit)."""
    from moto.awslambda_simple.models import LambdaSimpleBackend

    original = LambdaSimpleBackend.invoke
    counter = iter(range(1, 10**9))
    lock = threading.Lock()

    def invoke(self: Any, function_name: str, qualifier: Any, body: Any, headers: Any, response_headers: Any) -> bytes:
        name = function_name.split(":")[-1]
        with lock:
            request = f"local-{next(counter)}"
        handler = handlers.get(name)
        if handler is None:
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps({"errorType": "ResourceNotFound", "errorMessage": f"no handler for {name}"}).encode()
        event = json.loads(body) if body else {}
        try:
            result = handler(event, LambdaContext(name, request))
        except Exception as exc:  # a Lambda function error, as AWS reports it
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps(
                {
                    "errorType": type(exc).__name__,
                    "errorMessage": str(exc),
                    "stackTrace": traceback.format_exception(exc)[-3:],
                }
            ).encode()
        return json.dumps(result, default=str).encode()

    LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign]
    try:
        yield
    finally:
        LambdaSimpleBackend.invoke = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalStateMachine:
    """One state machine definition, ready to execute locally."""

    def __init__(
        self,
        definition_path: Path,
        handlers: Mapping[str, Handler],
        *,
        values: Mapping[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
        buckets: Sequence[str] = (),
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """`handlers` maps a substitution name (e.g. 'PreflightFunctionArn') to its handler;
        `values` fills other substitutions; `parameters` are SSM parameters and `buckets` S3 buckets
        to create first; `environment` is the functions' environment (set while the execution runs)."""
        self.definition = definition_path.read_text()
        self.handlers = dict(handlers)
        self.values = dict(values or {})
        self.parameters = dict(parameters or {})
        self.buckets = list(buckets)
        self.environment = dict(environment or {})
        missing = [p for p in placeholders(self.definition) if p not in self.handlers and p not in self.values]
        if missing:
            raise StateMachineError(f"{definition_path.name} needs substitutions with no value: {', '.join(missing)}")

    def run(
        self,
        execution_input: dict[str, Any],
        *,
        timeout: float = 3600,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_start: Callable[[], None] | None = None,
        poll_interval: float = 0.2,
    ) -> ExecutionResult:
        """Execute once; `on_start` runs inside the mock before the execution starts (to create
        the alarms a health gate reads, say), `on_event` gets each history event as it appears."""
        import boto3
        from moto import mock_aws

        # As in Lambda: the region is in the environment (handlers build their clients from it).
        os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
        os.environ.setdefault("AWS_REGION", REGION)
        config = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}
        function_names = {sub: re.sub(r"FunctionArn$", "", sub) or sub for sub in self.handlers}
        routed = {function_names[sub]: h for sub, h in self.handlers.items()}
        with mock_aws(config=config), _routed_lambdas(routed), _environment(self.environment):  # type: ignore[call-overload]
            iam = boto3.client("iam", region_name=REGION)
            role = iam.create_role(RoleName="zdm-local", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
            lam = boto3.client("lambda", region_name=REGION)
            package = io.BytesIO()
            with zipfile.ZipFile(package, "w") as archive:
                archive.writestr("handler.py", "# routed in-process by rehearsal.stepfunctions\n")
            arns: dict[str, str] = {}
            for sub, name in function_names.items():
                arns[sub] = lam.create_function(
                    FunctionName=name,
                    Runtime="python3.12",
                    Role=role,
                    Handler="handler.handler",
                    Code={"ZipFile": package.getvalue()},
                )["FunctionArn"]
            ssm = boto3.client("ssm", region_name=REGION)
            for name, value in self.parameters.items():
                ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=True)
            s3 = boto3.client("s3", region_name=REGION)
            for bucket in self.buckets:
                s3.create_bucket(Bucket=bucket)
            filled = _PLACEHOLDER.sub(lambda m: arns.get(m.group(1)) or self.values[m.group(1)], self.definition)
            if on_start is not None:
                on_start()
            sfn = boto3.client("stepfunctions", region_name=REGION)
            machine = sfn.create_state_machine(name="zdm-local", definition=filled, roleArn=role)["stateMachineArn"]
            started = time.monotonic()
            # Named, as AWS names an execution started without one (moto leaves $$.Execution.Name null)
            execution = sfn.start_execution(
                stateMachineArn=machine, name=str(uuid.uuid4()), input=json.dumps(execution_input)
            )["executionArn"]
            seen = 0
            history: list[dict[str, Any]] = []
            while True:
                description = sfn.describe_execution(executionArn=execution)
                events = _history(sfn, execution)
                for event in events[seen:]:
                    history.append(event)
                    if on_event is not None:
                        on_event(event)
                seen = len(events)
                if description["status"] != "RUNNING":
                    break
                if time.monotonic() - started > timeout:
                    sfn.stop_execution(executionArn=execution, error="Timeout", cause=f"local run exceeded {timeout}s")
                    raise StateMachineError(f"execution did not finish within {timeout}s")
                time.sleep(poll_interval)
            output = description.get("output")
            return ExecutionResult(
                status=description["status"],
                output=json.loads(output) if output else None,
                error=description.get("error"),
                cause=description.get("cause"),
                history=history,
                seconds=time.monotonic() - started,
            )


def _history(sfn: Any, execution: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"executionArn": execution, "maxResults": 1000}
        if token:
            kwargs["nextToken"] = token
        page = sfn.get_execution_history(**kwargs)
        events += page["events"]
        token = page.get("nextToken")
        if not token:
            return events
